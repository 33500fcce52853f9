"""sandbox.py — run untrusted Python in a throwaway child and bring back plain values.

Standard library only, no project imports: this file can be read in one sitting and copied elsewhere.

    compiled, results, status = run_child(setup, program, calls, like=expected_values)

Each call expression is evaluated in the child after `setup + program` ran; the child sends back each
value encoded from exact built-in types (ListNode / TreeNode as their values), the parent decodes it
into its own plain objects. The parent decides what a value means; the child never sees an expected
answer, so it cannot forge a comparison.

How a child is made (Linux only). A warm template interpreter, started once per grading thread with
the modules solutions import already loaded, forks one supervisor per check:
    template  (never reads a job, never runs response code: it only receives two pipe ends and limits)
    -> supervisor S  (new session; unshares mount, PID, network, IPC [and user, when not root])
       -> init, PID 1 of the new PID namespace (trusted: it never runs response code; mounts a private
          size-capped tmpfs, gives the worker private descriptors only (stdin an empty pipe, stdout and
          stderr a pipe it drains, the job and result pipes; nothing else open), forks the worker,
          waits for it at most the wall limit, then exits, which makes the kernel kill and reap
          everything left in the namespace)
          -> worker W: every resource limit set explicitly (rlimits()), chroot into
             the tmpfs, fresh anonymous session keyring, drop to a per-check uid (root) or drop every
             capability (user namespace), no_new_privs, seccomp filter, then reads the job from its
             own pipe, compiles, runs, and writes the result to its own pipe.
The parent reads the result pipe until end of file, then waits for the template's report that S has
exited; S exits only after init is reaped, i.e. after the namespace is empty. To kill a check the
template signals S (SIGUSR1), which kills init and still waits for it: a uid or process slot is never
reused while anything of the check is left. The template and all it forks have oom_score_adj 1000.

Covered:
  - forged results: values are recomputed by the parent's own `==`; the result stream is length-capped
    (MAX_MSG_BYTES), read into a bytearray (linear however it trickles in), nesting-checked on the
    raw bytes in one linear pass before parsing, and decoded in bounded time
    (sets and dicts are built only where the expected value has that type and the same size);
  - the harness holds its call list and encoder in locals bound before response code runs; patched
    modules or builtins, atexit hooks, early exits and lying return values can only produce a failure;
  - the grader itself: the worker cannot kill it or its process group (S starts a new session), and
    runs with a fixed minimal environment (_CHILD_ENV), none of the caller's;
  - escapees: everything the worker starts lives in its PID namespace and dies with init, whatever
    it does to its session, parent-death signal or threads; the parent confirms S was reaped;
  - files: the child only sees its own tmpfs (TMPFS_MB, TMPFS_INODES), which vanishes with the
    namespace; nothing it writes reaches the disk; the host mount point is a private empty directory;
  - kernel keyrings: add_key / request_key / keyctl are refused by seccomp (as are ptrace,
    process_vm_readv/writev and the host-wide sync / syncfs / sync_file_range), and the worker starts
    in a fresh anonymous session keyring;
  - shared descriptors: no host file (e.g. a /dev/null whose open file description carries locks and
    flags from one check to the next, and whose inode is every grader's) is open in the worker;
  - network, SysV/POSIX IPC, abstract sockets: own namespaces;
  - CPU: RLIMIT_CPU per process (what the code costs, independent of machine load); the wall clock
    gets WALL_FACTOR times that, for code that sleeps or blocks;
  - memory: address-space limit; at most NPROC processes per sandbox uid (root mode);
  - concurrent graders: root-mode uids are held with a lock file each (UID_LOCK_DIR, under a folder
    only root can write), so two grader processes never share a uid or sweep each other's children;
    the mount-point folders of graders killed with SIGKILL are removed by the next one to start;
  - host memory: oom_score_adj 1000, so the OOM killer takes a sandboxed process before the caller;
    as root, a memory cgroup per template (memory_cgroup) caps a check at NPROC x MEM_MB in all;
  - nothing of one child reaches the next: every check is a fresh fork of a template that holds no
    job data, in fresh namespaces and a fresh tmpfs.
Not covered:
  - the one-bit verdict "the call did not raise" (used for a response's own run_tests()) is reported
    by the process that runs the response's code; that code can forge it in-process (e.g. write a
    result to its descriptor, or rewrite the harness's functions). Only computed values are trusted;
  - kernel exploits, side channels and timing: the seccomp filter is a deny list, so io_uring, perf
    events and user-mode userfaultfd remain kernel surface; the host name is visible (no UTS
    namespace); CPU time of more than one process (each of up to NPROC processes has its own CPU
    limit); memory of several processes where no memory cgroup can be made (NPROC x MEM_MB of
    address space at most);
  - without root: needs unprivileged user namespaces (refused with SandboxUnavailable otherwise), and
    RLIMIT_NPROC counts all processes of the real user.
"""
import atexit, contextlib, fcntl, itertools, json, math, os, queue, re, select, shutil, signal, socket, stat
import subprocess, sys, tempfile, threading, time

CPU_S = 10.0          # CPU seconds per check (every canonical solution of a 119-problem split passes)
WALL_FACTOR = 6       # wall-clock limit = WALL_FACTOR * CPU limit: for code that sleeps, loaded machines
MEM_MB = 1024         # address space per process
NPROC = 4             # processes + threads of a sandbox uid (root mode); caps memory at NPROC x MEM_MB
FSIZE_MB = 8          # largest file the child may write
TMPFS_MB = 16         # the child's whole writable file system
TMPFS_INODES = 1000
MAX_MSG_BYTES = 4 << 20
MAX_DEPTH = 120       # bracket nesting of a result message (values nest at most 50 deep, 2 brackets each)
UID_BASE, UID_COUNT = 62000, 2048   # root only: uids nothing else on the machine uses (62000-64047)
STACK_MB = 8          # the usual default stack of a process
WORK_ROOT = None      # where the per-template mount point lives (None: tempfile.gettempdir())


def root_only(path):
    """True when path and every folder above it are owned by root and writable by nobody else."""
    p = os.path.realpath(path)
    while True:
        try:
            st = os.lstat(p)
        except OSError:
            return False
        if st.st_uid != 0 or st.st_mode & 0o022:
            return False
        if p == "/":
            return True
        p = os.path.dirname(p)


# root only: the uid lock files live under a folder no other user can create or replace
UID_LOCK_DIR = os.path.join("/run" if root_only("/run") else "/var/lib", "sandbox-uids")


def rlimits(cpu, mem, nproc):
    """Every resource limit of the worker (soft = hard), set explicitly: nothing is inherited from the
    caller. Values never go above the caller's own hard limit."""
    return dict(CPU=cpu, FSIZE=FSIZE_MB << 20, DATA=mem, STACK=min(STACK_MB << 20, mem), CORE=0, RSS=mem,
                NPROC=nproc, NOFILE=64, MEMLOCK=0, AS=mem, LOCKS=64, SIGPENDING=64, MSGQUEUE=0, NICE=0,
                RTPRIO=0, RTTIME=cpu * 1000000)


class SandboxUnavailable(RuntimeError):
    """The child could not isolate itself; model code is never run without the sandbox."""


# ----------------------------------------------------------------------------- the template

# Runs as `python -I -S -c TEMPLATE sockfd`. Loads what solutions import, then loops: receive a header
# (limits, uid, mount point) with the worker's job-read and result-write pipe ends; fork S; report b"P"
# + S's pid; wait for S; report b"D" + its wait status. The job text never passes through here.
TEMPLATE = r"""
import sys, os, socket, struct, json, _json, resource, ctypes, signal, select, time
for m in ("random functools collections string math datetime typing itertools heapq bisect "
          "operator re copy array fractions decimal statistics dataclasses enum numbers cmath "
          "queue time textwrap unicodedata _strptime abc types weakref").split():
    try:
        __import__(m)
    except Exception:
        pass
libc = ctypes.CDLL(None, use_errno=True)
with open("/proc/self/oom_score_adj", "w") as f:
    f.write("1000")                      # for everything forked from here: the sandbox goes first when the
                                         # host runs out of memory (set once: a write per check costs)
# audit arch, keyctl, add_key, request_key, ptrace, process_vm_readv/writev, capset, sync, syncfs, sync_file_range
ARCH = {"x86_64": (0xC000003E, 250, 248, 249, 101, 310, 311, 126, 162, 306, 277),
        "aarch64": (0xC00000B7, 219, 217, 218, 117, 270, 271, 91, 81, 267, 84)}.get(os.uname().machine)
CHILD = []                               # S: a pidfd of its init, once forked

def seccomp():
    # refuse the kernel keyring calls, ptrace, cross-process memory access and the host-wide sync
    # calls (they would flush the host's dirty pages); kill other ABIs
    audit, deny = ARCH[0], ARCH[1:7] + ARCH[8:]
    F = lambda code, jt, jf, k: struct.pack("=HBBI", code, jt, jf, k)
    prog = [F(0x20, 0, 0, 4), F(0x15, 1, 0, audit), F(0x06, 0, 0, 0x80000000),   # arch check
            F(0x20, 0, 0, 0), F(0x35, len(deny) + 1, 0, 0x40000000)]            # x32 ABI -> deny
    for i, nr in enumerate(deny):
        prog.append(F(0x15, len(deny) - i, 0, nr))
    prog += [F(0x06, 0, 0, 0x7FFF0000), F(0x06, 0, 0, 0x00050001)]              # allow / EPERM
    buf = ctypes.create_string_buffer(b"".join(prog))
    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fp = Fprog(len(prog), ctypes.addressof(buf))
    return libc.prctl(22, 2, ctypes.byref(fp), 0, 0) == 0    # PR_SET_SECCOMP, SECCOMP_MODE_FILTER

def worker(h, jr, rw):
    write, _exit, _type, _len = os.write, os._exit, type, len
    int_repr, float_repr, qstr = int.__repr__, float.__repr__, _json.encode_basestring_ascii
    tname = lambda t: type.__dict__["__name__"].__get__(t)
    def send(b):
        while b:
            b = b[write(rw, b):]
    try:
        for name, val in h["rlimits"].items():   # every limit, none inherited from the caller
            lim = getattr(resource, "RLIMIT_" + name, {"LOCKS": 10}.get(name))
            hard = resource.getrlimit(lim)[1]
            val = val if hard == resource.RLIM_INFINITY else min(val, hard)   # never above the caller's
            resource.setrlimit(lim, (val, val))
        os.chdir(h["mnt"]); os.chroot("."); os.chdir("/")
        libc.syscall(ARCH[1], 1, None)        # KEYCTL_JOIN_SESSION_KEYRING: a fresh anonymous one
        if h["root"]:
            os.setgroups([]); os.setgid(h["uid"]); os.setuid(h["uid"])
        else:
            libc.prctl(28, 0x2f, 0, 0, 0)    # SECBIT_NOROOT|_LOCKED|NO_SETUID_FIXUP|_LOCKED|KEEP_CAPS_LOCKED
            hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
            data = (ctypes.c_uint32 * 6)()
            if libc.syscall(ARCH[7], hdr, data) != 0:   # capset: no capabilities at all
                send(b"X"); _exit(0)
        libc.prctl(38, 1, 0, 0, 0)           # PR_SET_NO_NEW_PRIVS
        if not seccomp():
            send(b"X"); _exit(0)
    except Exception:                    # e.g. setuid refused: nothing ran
        send(b"X"); _exit(0)
    raw = []
    while True:
        b = os.read(jr, 1 << 16)
        if not b:
            break
        raw.append(b)
    os.close(jr)
    raw = b"".join(raw)
    job = json.loads(raw.decode("utf-8"))
    # everything the harness needs is bound here, before response code runs: rebinding or mutating
    # a job list afterwards changes nothing (a tuple of str cannot be mutated in place)
    calls, stop_at_error, src = tuple(str(c) for c in job["calls"]), job["stop_at_error"] is True, \
        job["setup"] + "\n\n" + job["program"]
    del job, raw
    def enc(x, depth):
        t = _type(x)
        if depth > 50:
            raise ValueError
        if t is bool:
            return '["b",true]' if x is True else '["b",false]'
        if t is int:
            return '["i","' + int_repr(x) + '"]'
        if t is float:
            return '["f","' + float_repr(x) + '"]'
        if t is str:
            return '["s",' + qstr(x) + "]"
        if x is None:
            return '["n"]'
        if t is list or t is tuple or t is set or t is frozenset:
            tag = {list: "l", tuple: "t", set: "S", frozenset: "F"}[t]
            return '["' + tag + '",[' + ",".join([enc(e, depth + 1) for e in list(x)]) + "]]"
        if t is dict:
            return '["d",[' + ",".join(["[" + enc(k, depth + 1) + "," + enc(v, depth + 1) + "]"
                                        for k, v in list(dict.items(x))]) + "]]"
        if tname(t) == "ListNode":       # any ListNode class: .val / .next read, values encoded strictly
            vals, n = [], x
            while n is not None:
                if _len(vals) > 100000:
                    raise ValueError
                vals.append(enc(n.val, depth + 1)); n = n.next
            return '["L",[' + ",".join(vals) + "]]"
        if tname(t) == "TreeNode":       # level order, trailing Nones dropped
            out, q, i = [], [x], 0
            while i < _len(q):
                n = q[i]; i += 1
                if n is None:
                    out.append('["n"]'); continue
                if _len(q) > 200000:
                    raise ValueError
                out.append(enc(n.val, depth + 1)); q.append(n.left); q.append(n.right)
            while out and out[-1] == '["n"]':
                out.pop()
            return '["T",[' + ",".join(out) + "]]"
        raise ValueError
    try:
        code = compile(src, "<program>", "exec")
    except BaseException:
        send(b"C0"); _exit(0)
    send(b"C1")
    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(code, ns)
    except BaseException:
        send(b'["load_error"]\0END'); _exit(0)
    items = []
    for call in calls:
        try:
            items.append('["ok",' + enc(eval(call, ns), 0) + "]")
        except BaseException:
            items.append('["err"]')
            if stop_at_error:
                break
    send(("[" + ",".join(items) + "]").encode("ascii") + b"\0END")
    _exit(0)

def init(h, jr, rw):
    # PID 1 of the new namespace. Trusted: never runs response code. When it exits, the kernel kills
    # and reaps every process left in the namespace before its own parent can reap it.
    libc.prctl(1, 9, 0, 0, 0)            # PR_SET_PDEATHSIG = SIGKILL
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)   # no handler: the namespace cannot signal it
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    MS_REC, MS_PRIVATE, NOSUID, NODEV = 0x4000, 0x40000, 0x2, 0x4
    opts = "size=%dk,nr_inodes=%d,mode=0700" % (h["tmpfs"] >> 10, h["inodes"])
    if h["root"]:
        opts += ",uid=%d,gid=%d" % (h["uid"], h["uid"])
    if (libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0 or
            libc.mount(b"tmpfs", h["mnt"].encode(), b"tmpfs", NOSUID | NODEV, opts.encode()) != 0):
        os.write(rw, b"X"); os._exit(0)
    # Private descriptors only: stdin is a pipe with no writer (end of file), stdout and stderr a pipe
    # init drains; nothing of the host (its /dev/null, whose open file description and inode carry
    # locks, flags and times from one check to the next) stays open. Worker: 0-2, job 3, result 4.
    nr, nw = os.pipe()
    dr, dw = os.pipe()
    os.close(nw)
    fds = (nr, dw, jr, rw, dr)
    hi = max(fds) + 1                    # above every one of them: no copy overwrites another
    for i, fd in enumerate(fds):
        os.dup2(fd, hi + i)
    os.closerange(0, hi)
    for i, to in enumerate((0, 1, 3, 4, 5)):
        os.dup2(hi + i, to)
    os.dup2(1, 2)
    os.closerange(6, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    try:
        w = os.fork()
    except OSError:
        os.write(4, b"X"); os._exit(0)
    if w == 0:
        try:
            os.close(5)
            worker(h, 3, 4)
        finally:
            os._exit(0)
    for fd in (0, 1, 2, 3, 4):
        os.close(fd)
    pfd = os.pidfd_open(w)
    end, wait = time.monotonic() + h["wall"], [pfd, 5]
    while time.monotonic() < end:        # until the worker's whole thread group exited, or time is up
        ready = select.select(wait, [], [], max(end - time.monotonic(), 0))[0]
        if pfd in ready:
            break
        if 5 in ready and not os.read(5, 1 << 16):
            wait = [pfd]                 # every writer is gone
    os._exit(0)

def supervise(h, jr, rw):
    libc.prctl(1, 9, 0, 0, 0)            # dies with the template
    os.setsid()
    root = h["root"]
    uid, gid = os.getuid(), os.getgid()
    flags = 0x20000 | 0x20000000 | 0x40000000 | 0x08000000 | (0 if root else 0x10000000)
    if ARCH is None or libc.unshare(flags) != 0:   # NEWNS | NEWPID | NEWNET | NEWIPC [| NEWUSER]
        os.write(rw, b"X"); os._exit(0)
    try:
        if not root:
            for f, v in (("setgroups", "deny"), ("uid_map", "0 %d 1" % uid), ("gid_map", "0 %d 1" % gid)):
                with open("/proc/self/" + f, "w") as fh:
                    fh.write(v)
        p = os.fork()
    except OSError:
        os.write(rw, b"X"); os._exit(0)
    if p == 0:
        try:
            init(h, jr, rw)
        finally:
            os._exit(0)
    CHILD.append(os.pidfd_open(p))       # a pidfd: never a reused pid, even once init is reaped
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})   # a kill request now reaches init
    os.close(jr); os.close(rw)
    os.waitpid(p, 0)                     # returns once the namespace is empty
    os._exit(0)

def on_kill(*_):
    # S's SIGUSR1 (the template's kill request): SIGKILL init, whose exit kills and reaps the whole
    # namespace; S keeps waiting for it, so the template's b"D" still means "nothing is left"
    if CHILD:
        try:
            signal.pidfd_send_signal(CHILD[0], signal.SIGKILL)
        except OSError:
            pass                         # already reaped
    else:
        os._exit(0)                      # init not forked yet: nothing to wait for

signal.signal(signal.SIGUSR1, on_kill)

sock = socket.socket(fileno=int(sys.argv[1]))
sock.sendall(b"R")
while True:
    try:
        msg, fds, _, _ = socket.recv_fds(sock, 4096, 2)
    except OSError:
        os._exit(0)
    if not msg:
        os._exit(0)                      # the grader process is gone
    if msg == b"K":                      # a late kill request for a job already reaped
        for fd in fds:
            os.close(fd)
        continue
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})   # S unblocks it once init's pid is known
    pid = os.fork()
    if pid == 0:
        try:
            sock.close()
            supervise(json.loads(msg), fds[0], fds[1])
        finally:
            os._exit(0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    for fd in fds:
        os.close(fd)
    del msg, fds
    pfd = os.pidfd_open(pid)
    sock.sendall(b"P" + struct.pack("<q", pid))
    while pfd not in select.select([sock, pfd], [], [])[0]:
        m, fds, _, _ = socket.recv_fds(sock, 4096, 2)
        for fd in fds:
            os.close(fd)
        os.kill(pid, signal.SIGUSR1)     # b"K" (or the grader is gone): S, not reaped yet, kills init
        if not m:                        # and exits once the namespace is empty
            os.waitpid(pid, 0); os._exit(0)
    os.close(pfd)
    _, st = os.waitpid(pid, 0)
    sock.sendall(b"D" + struct.pack("<q", st))
"""

_CHILD_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
              "PYTHONDONTWRITEBYTECODE": "1"}


class Template:
    """One warm template process and its private mount-point directory."""

    def __init__(self):
        self.owner = os.getpid()
        root = WORK_ROOT or tempfile.gettempdir()
        sweep_stale(root)
        self.mnt = tempfile.mkdtemp(prefix=f"sandbox_{self.owner}-{start_time(self.owner)}_", dir=root)
        self.cgroup, self.memory = memory_cgroup(os.path.basename(self.mnt)), None
        if os.getuid() != 0:
            os.chmod(self.mnt, 0o700)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = a
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", TEMPLATE, str(b.fileno())],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env=_CHILD_ENV, pass_fds=(b.fileno(),),
                                     start_new_session=True, cwd="/")
        b.close()
        if self.cgroup:
            try:                          # once: moving a process between cgroups is slow
                with open(os.path.join(self.cgroup, "cgroup.procs"), "w") as f:
                    f.write(str(self.proc.pid))
            except OSError:
                with contextlib.suppress(OSError):
                    os.rmdir(self.cgroup)
                self.cgroup = None
        self.sock.settimeout(60)
        if self.sock.recv(1) != b"R":
            self.close()
            raise SandboxUnavailable("the sandbox template process did not start")
        self.sock.settimeout(None)

    def limit_memory(self, nbytes):
        """The memory limit of the template's cgroup (its checks, all processes together), written
        only when it changes: a write costs a tenth of a millisecond."""
        if self.cgroup and nbytes != self.memory:
            v1 = os.path.exists(os.path.join(self.cgroup, "memory.limit_in_bytes"))
            with contextlib.suppress(OSError):   # best effort, like the cgroup itself
                with open(os.path.join(self.cgroup, "memory.limit_in_bytes" if v1 else "memory.max"), "w") as f:
                    f.write(str(nbytes))
                self.memory = nbytes

    def recv(self, n, timeout):
        self.sock.settimeout(timeout)
        out = bytearray()
        while len(out) < n:
            b = self.sock.recv(n - len(out))
            if not b:
                raise OSError("template closed")
            out += b
        return bytes(out)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
        try:
            self.proc.kill()
        except OSError:
            pass
        self.proc.wait()
        rmtree(self.mnt)
        for _ in range(100) if self.cgroup else ():    # empty once the template's children are gone
            try:
                os.rmdir(self.cgroup)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)


def memory_cgroup(name):
    """A new memory cgroup `name` under this process's own (root only; a template moves into it, and
    Template.limit_memory sets its limit), or None where none can be made: not root, no memory
    controller, a cgroup v2 tree that does not delegate it. Stale ones of graders that are gone are
    removed first. Without one the sandbox relies on oom_score_adj and the address-space limits."""
    if os.getuid() != 0:
        return None
    try:
        with open("/proc/self/cgroup") as f:
            own = dict(line.rstrip("\n").split(":", 2)[1:] for line in f)       # controllers -> path
        with open("/proc/self/mountinfo") as f:
            mounts = [(l.split(" - ")[0].split()[4], *l.split(" - ")[1].split()[:3:2]) for l in f]
        for mnt, fstype, opts in mounts:
            if fstype == "cgroup" and "memory" in opts.split(","):
                rel = next(p for c, p in own.items() if "memory" in c.split(","))
            elif fstype == "cgroup2" and "" in own:
                rel = own[""]
                with open(os.path.join(mnt, rel.lstrip("/"), "cgroup.subtree_control")) as f:
                    if "memory" not in f.read().split():
                        continue
            else:
                continue
            parent = os.path.join(mnt, rel.lstrip("/"))
            sweep_stale(parent, rm=os.rmdir)
            os.mkdir(os.path.join(parent, name), 0o755)
            return os.path.join(parent, name)
    except (OSError, StopIteration, ValueError):
        pass
    return None


def start_time(pid):
    """A process's start time in clock ticks since boot (None when it is gone): with the pid, it names
    one process, never a later one that reuses the pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


swept = set()   # roots already swept by this process (sweep_stale runs once per root)


def sweep_stale(root, rm=None):
    """Remove the mount-point folders (sandbox_<pid>-<start time>_*) that graders no longer running
    left in root, e.g. when killed with SIGKILL (rm=os.rmdir: their memory cgroups). Once per folder
    and process; another user's are kept."""
    if root in swept:
        return
    swept.add(root)
    for name in os.listdir(root):
        m = re.fullmatch(r"sandbox_(\d+)-(\d+|None)_\w+", name)
        d = os.path.join(root, name)
        try:
            st = os.lstat(d)
        except OSError:
            continue
        if m and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and str(start_time(int(m[1]))) != m[2]:
            with contextlib.suppress(OSError):
                (rm or rmtree)(d)


_idle = queue.LifoQueue()
_all_templates = []
_lock = threading.Lock()


def _get_template(fresh):
    if not fresh:
        while True:
            try:
                t = _idle.get_nowait()
            except queue.Empty:
                break
            if t.owner == os.getpid():
                return t
    t = Template()
    with _lock:
        _all_templates.append(t)
    return t


def _drop_template(t):
    with _lock:
        if t in _all_templates:
            _all_templates.remove(t)
    t.close()


def close_templates():
    """Stop every warm template of this process and remove its directory (also run at exit)."""
    while True:
        try:
            _idle.get_nowait()
        except queue.Empty:
            break
    with _lock:
        ts, _all_templates[:] = list(_all_templates), []
    for t in ts:
        if t.owner == os.getpid():
            t.close()


atexit.register(close_templates)


# ----------------------------------------------------------------------------- sandbox uids (root)

_uid_free, _uid_fds, _uid_lock = [], {}, threading.Lock()


def acquire_uid():
    """A uid no other grader process on this machine uses now: each one is held by an flock on its own
    lock file for as long as this process lives. Anything left running as that uid is killed first."""
    with _uid_lock:
        if _uid_free:
            return _uid_free.pop()
        if not root_only(os.path.dirname(UID_LOCK_DIR)):
            raise SandboxUnavailable(f"{os.path.dirname(UID_LOCK_DIR)} must be owned and writable by root only")
        os.makedirs(UID_LOCK_DIR, mode=0o700, exist_ok=True)
        st = os.lstat(UID_LOCK_DIR)
        if st.st_uid != 0 or not os.path.isdir(UID_LOCK_DIR) or os.path.islink(UID_LOCK_DIR):
            raise SandboxUnavailable(f"{UID_LOCK_DIR} must be a directory owned by root")
        for uid in range(UID_BASE, UID_BASE + UID_COUNT):
            if uid in _uid_fds:
                continue
            fd = os.open(os.path.join(UID_LOCK_DIR, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            _uid_fds[uid] = fd
            kill_uid(uid)
            return uid
    raise SandboxUnavailable(f"all {UID_COUNT} sandbox uids are in use")


def release_uid(uid):
    with _uid_lock:
        _uid_free.append(uid)


def _forget_after_fork():
    """A forked process shares its parent's uid locks (an flock belongs to the open file, which fork
    duplicates): it would run its checks under the parent's uids, two checks of two processes under one
    uid at once (sharing its process limit, and kill_uid of either sweeping both). So the child forgets
    the parent's uids, locks, idle templates and template sockets (the parent keeps all of them), and
    takes its own."""
    global _uid_lock, _lock, _idle
    fds, socks = list(_uid_fds.values()), [t.sock for t in _all_templates if t.owner != os.getpid()]
    _uid_lock, _lock, _idle = threading.Lock(), threading.Lock(), queue.LifoQueue()
    _uid_fds.clear()
    _uid_free.clear()
    _all_templates[:] = [t for t in _all_templates if t.owner == os.getpid()]
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()


os.register_at_fork(after_in_child=_forget_after_fork)


def kill_uid(uid):
    """SIGKILL every process running as uid, zombie thread-group leaders with live threads included,
    and wait until none is left, zombies included (they still count against the uid's process limit)."""
    for _ in range(500):
        pids, zombies = [], 0
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                st = os.stat(f"/proc/{p}")
                if st.st_uid != uid:
                    continue
                with open(f"/proc/{p}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                if state == "Z" and len(os.listdir(f"/proc/{p}/task")) <= 1:
                    zombies += 1             # really dead; its parent (init's exit) reaps it
                    continue
            except (OSError, IndexError):
                continue
            pids.append(int(p))
        if not pids and not zombies:
            return
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


def rmtree(d):
    """Remove a directory tree whatever modes its owner gave it (deep nesting, mode-000 folders)."""
    if not os.path.lexists(d):
        return
    try:
        shutil.rmtree(d)
        return
    except Exception:  # noqa: BLE001 - e.g. nesting past the recursion limit, unreadable folders
        pass
    subprocess.run(["chmod", "-R", "u+rwx", "--", d], check=False, stderr=subprocess.DEVNULL)
    subprocess.run(["rm", "-rf", "--", d], check=False)


# ----------------------------------------------------------------------------- run one child

def wall_limit(cpu_s):
    """The wall-clock limit of one check: WALL_FACTOR x its CPU limit, for code that sleeps or blocks."""
    return max(WALL_FACTOR * cpu_s, 1.0)


def run_child(setup, program, calls, like=None, cpu_s=CPU_S, mem_mb=MEM_MB, stop_at_error=False,
              fresh=False, wall_s=None):
    """Run setup+program in a sandboxed child and evaluate each call expression there.
    like[i], when given, is the value call i is expected to equal: it only decides which containers
    are worth building (see decode). Returns (compiled: bool|None, results: list|None, status: str);
    results[i] is ('ok', value) or ('err',); None when the child died, ran out of time, flooded or
    tampered with the channel. fresh=True starts (and stops) a new template for this one check.
    wall_s: the wall-clock limit (default WALL_FACTOR x cpu_s; a caller's budget may give less).
    Raises SandboxUnavailable when no sandbox could be made (nothing ran)."""
    root = os.getuid() == 0
    uid = acquire_uid() if root else os.getuid()
    cpu = max(1, math.ceil(cpu_s))
    wall = wall_limit(cpu_s) if wall_s is None else wall_s
    t, fds, started = None, [], False
    data, status = bytearray(), "ok"          # a bytearray: appending is linear, whatever the chunk sizes
    try:
        t = _get_template(fresh)
        jr, jw = os.pipe()
        rr, rw = os.pipe()
        fds = [jw, rr]
        hdr = dict(uid=uid, root=root, wall=wall, rlimits=rlimits(cpu, mem_mb << 20, NPROC),
                   tmpfs=TMPFS_MB << 20, inodes=TMPFS_INODES, mnt=t.mnt)
        t.limit_memory(NPROC * mem_mb << 20)
        try:
            socket.send_fds(t.sock, [json.dumps(hdr).encode()], [jr, rw])
        finally:
            os.close(jr); os.close(rw)
        if t.recv(9, 30)[:1] != b"P":
            raise OSError("template protocol")
        started = True
        job = json.dumps({"setup": setup, "program": program, "calls": list(calls),
                          "stop_at_error": bool(stop_at_error)}).encode()
        os.set_blocking(jw, False)
        deadline = time.monotonic() + wall + 10.0    # init enforces `wall`; this is a safety net
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                status = "timeout"; break
            wl = [jw] if jw is not None else []
            ready, wready, _ = select.select([rr], wl, [], left)
            if wready:
                try:
                    job = job[os.write(jw, job[:1 << 16]):]
                except OSError:
                    job = b""
                if not job:
                    os.close(jw); fds.remove(jw); jw = None
            if ready:
                chunk = os.read(rr, 1 << 16)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_MSG_BYTES:
                    status = "flood"; break
        if status != "ok" or not data.endswith(b"\0END"):
            t.sock.send(b"K")                          # the template kills S and init (still unreaped)
        if t.recv(9, 30)[:1] != b"D":                  # S reaped: nothing of the child is left
            raise OSError("template protocol")
    except OSError as e:
        if t is not None:
            _drop_template(t); t = None                # its children die with it (PDEATHSIG)
        if root:
            kill_uid(uid)
        if not started:                                # nothing ran: no label may come of it
            raise SandboxUnavailable(f"the sandbox template failed before the check started ({e})") from None
        if status == "ok":
            status = "died"
    finally:
        for fd in fds:
            os.close(fd)
        if root:
            release_uid(uid)
        if t is not None:
            if fresh:
                _drop_template(t)
            else:
                _idle.put(t)
    data = bytes(data)
    if data[:1] == b"X":
        raise SandboxUnavailable(
            "the grader's sandbox could not isolate the child (namespaces: network, IPC, mount, PID"
            + ("" if root else ", user") + "; tmpfs; seccomp); run as root or enable unprivileged user "
            "namespaces (sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0). "
            "Model-written code is never run without it.")
    compiled = {b"C1": True, b"C0": False}.get(data[:2])
    if status != "ok":
        return compiled, None, status
    if compiled is None:
        return None, None, "died"
    if not compiled:
        return False, None, "syntax"
    body = data[2:]
    if not body.endswith(b"\0END") or body.count(b"\0END") != 1:
        return True, None, "died" if not body else "tampered"
    try:
        msg = parse_message(body[:-4])
        if msg == ["load_error"]:
            return True, None, "load_error"
        if type(msg) is not list or len(msg) > len(calls):
            return True, None, "tampered"
        like = list(like) if like is not None else [None] * len(calls)
        results = [("ok", decode(it[1], lk)) if type(it) is list and len(it) == 2 and it[0] == "ok"
                   else ("err",) for it, lk in zip(msg, like)]
    except Exception:  # noqa: BLE001 - anything malformed is a failure, never a pass
        return True, None, "tampered"
    return True, results, "ok"


# ----------------------------------------------------------------------------- decoding

_ESCAPE = re.compile(rb"\\.", re.DOTALL)       # a backslash and the byte it escapes: no backtracking
_KEEP = bytes(range(256)).translate(None, b"[]{}")
_STEP = bytes.maketrans(b"[]", b"\x01\xff")


def nesting_depth(raw):
    """Bracket depth of a JSON text, from the raw bytes (strings skipped): linear time, no recursion.
    Escape pairs go first (left to right, as a JSON reader pairs them), then every second piece
    between quotes is string content. A stray backslash outside a string can only hide brackets after
    it, where the JSON reader has already stopped."""
    br = b"".join(_ESCAPE.sub(b"", raw).split(b'"')[::2]).translate(None, _KEEP)
    if b"{" in br or b"}" in br:
        return MAX_DEPTH + 1                  # the protocol has no objects
    steps = memoryview(br.translate(_STEP)).cast("b")
    return max(itertools.accumulate(steps), default=0)


def parse_message(raw):
    if len(raw) > MAX_MSG_BYTES or nesting_depth(raw) > MAX_DEPTH:
        raise ValueError("message too large or too deep")
    return json.loads(raw.decode("ascii"), parse_constant=_refuse)


def _refuse(s):
    raise ValueError(s)


class Linked:
    """A returned ListNode / TreeNode chain, as its values. Equal to no plain value, like the real
    objects (which have no __eq__); compared only through is_same_list / is_same_tree asserts."""
    __slots__ = ("kind", "vals")

    def __init__(self, kind, vals):
        self.kind, self.vals = kind, vals


class Unmatched:
    """Stands for a container that cannot equal the expected value (wrong type or size): never built,
    so a hostile set or dict (e.g. colliding hashes) costs nothing. Equal only to itself."""
    __slots__ = ()


def decode(v, like=None):
    """Tagged JSON value from the child -> plain Python value (the parent's own types, own ==).
    Sets and dicts are built only when `like` is a set / dict of the same size, so their cost is
    bounded by the expected value's size whatever the child sent; elsewhere they become Unmatched."""
    if type(v) is not list or not v or type(v[0]) is not str:
        raise ValueError("malformed value")
    tag = v[0]
    if tag == "n":
        return None
    x = v[1]
    if tag == "b":
        if type(x) is not bool:
            raise ValueError
        return x
    if tag in ("i", "f", "s"):
        if type(x) is not str:
            raise ValueError
        if tag == "i":
            if len(x) > 5000:
                raise ValueError
            return int(x)
        if tag == "f":
            if len(x) > 400:
                raise ValueError
            return float(x)
        return x
    if type(x) is not list:
        raise ValueError
    if tag in ("l", "t", "L", "T"):
        likes = like if type(like) in (list, tuple) and len(like) == len(x) else [None] * len(x)
        vals = [decode(e, lk) for e, lk in zip(x, likes)]
        return tuple(vals) if tag == "t" else Linked(tag, vals) if tag in ("L", "T") else vals
    if tag in ("S", "F"):
        if type(like) not in (set, frozenset) or len(x) != len(like):
            return Unmatched()
        vals = [decode(e) for e in x]
        return set(vals) if tag == "S" else frozenset(vals)
    if tag == "d":
        if type(like) is not dict or len(x) != len(like):
            return Unmatched()
        out = {}
        for kv in x:
            if type(kv) is not list or len(kv) != 2:
                raise ValueError
            k = decode(kv[0])
            out[k] = decode(kv[1], like.get(k) if k.__hash__ is not None else None)
        return out
    raise ValueError(tag)
