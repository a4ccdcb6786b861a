"""The `vmcell` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .config import (DEFAULT_AUTO_PAUSE_S, DEFAULT_HOST, DEFAULT_MAX_SESSIONS, DEFAULT_PORT, DEFAULT_TEMPLATE,
                     HOST_TOOL_PACKAGES, QEMU_BINARY, QEMU_IMG_BINARY, QEMU_SANDBOX, REPO_ROOT, run_dir, state_dir,
                     vmcell_home)
from .errors import VmcellError
from .progress import Progress


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="vmcell: %(message)s",
                        stream=sys.stderr)
    # The MCP SDK logs every stateless HTTP exchange at INFO ("Terminating session: None").
    logging.getLogger("mcp").setLevel(logging.DEBUG if verbose else logging.WARNING)


# ---- doctor -------------------------------------------------------------------------------------


def cmd_doctor(args) -> int:
    from .images import planned_images
    from .templates import available_templates, builds_of, load_template, planned_template
    from .vm import QemuBackend, detect_accelerator

    problems = 0

    def report(ok: bool, what: str, fix: str = "", essential: bool = True) -> None:
        nonlocal problems
        mark = "ok  " if ok else ("FAIL" if essential else "warn")
        print(f"[{mark}] {what}" + ("" if ok or not fix else f"\n         fix: {fix}"))
        problems += (not ok) and essential

    accel = detect_accelerator()
    report(True, f"accelerator: {accel.name.upper()} ({accel.reason})")
    for tool in (QEMU_BINARY, QEMU_IMG_BINARY):
        path = shutil.which(tool)
        version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.splitlines()[0] if path else ""
        report(bool(path), f"{tool}: {version or 'missing'}", f"apt-get install {HOST_TOOL_PACKAGES[tool]}")
    for tool in ("mmdebstrap", "mkfs.ext4", "apt-get", "dpkg-deb"):
        report(bool(shutil.which(tool)), f"{tool} (image builds): {'found' if shutil.which(tool) else 'missing'}",
               f"apt-get install {HOST_TOOL_PACKAGES[tool]}")
    home = vmcell_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
        writable = os.access(home, os.W_OK)
    except OSError:
        writable = False
    report(writable, f"VMCELL_HOME {home} writable", "set VMCELL_HOME to a writable directory")
    try:
        images = planned_images()
        missing = images.missing()
        report(not missing, "guest images (kernel, initramfs, rootfs) " + ("built" if not missing else
               "missing: " + ", ".join(p.name for p in missing)), "vmcell template build", essential=False)
    except VmcellError as exc:
        report(False, f"image recipe: {exc}")
    _doctor_confinement(report)
    backend = QemuBackend()
    planned_keys = {}
    for name in available_templates():
        try:
            planned = asyncio.run(planned_template(load_template(name), backend))
        except VmcellError as exc:
            report(False, f"template {name!r}: {exc}", essential=False)
            continue
        planned_keys[name] = planned
        builds = builds_of(name)
        if planned.is_built():
            meta = planned.meta
            report(True, f"template {name!r}: built {planned.key} ({meta['accel'].upper()}, boot "
                         f"{meta['timings'].get('boot_s')}s), up to date with its sources")
        elif builds:
            built_key = builds[0].name.rsplit("-", 1)[-1]
            report(False, f"template {name!r}: built {built_key}, but its sources changed since: rebuild pending "
                          f"(today's sources make {planned.key})",
                   f"vmcell template build {name} (then restart a server that serves it)", essential=False)
        else:
            report(False, f"template {name!r}: not built", f"vmcell template build {name}", essential=False)
    _doctor_server(report, planned_keys)
    stale = [p.name for p in run_dir().iterdir()] if run_dir().is_dir() else []
    report(True, f"VM work directories in use or stale: {len(stale)} (stale ones are reaped at the next start)")
    print("vmcell is ready." if not problems else f"{problems} problem(s) to fix.")
    return 1 if problems else 0


def _doctor_confinement(report) -> None:
    """What each VM's QEMU will run under here, and why any part is not active."""
    from .jail import Jailer

    path = shutil.which(QEMU_BINARY)
    helptext = subprocess.run([path, "-help"], capture_output=True, text=True).stdout if path else ""
    report("-sandbox" in helptext, f"QEMU seccomp filter (-sandbox {QEMU_SANDBOX})",
           "a QEMU built with seccomp (Debian's qemu-system-x86 is)")
    _, confinement = Jailer.detect()
    for ok, line in confinement.lines():
        report(ok, line, "run `vmcell serve` as root (it drops what it hands to QEMU)", essential=False)


def _doctor_server(report, planned: dict) -> None:
    """What a server at the SDK's URL ($VMCELL_URL, else the default) serves, asked with the local token."""
    import urllib.error
    import urllib.request

    from .client import DEFAULT_URL

    url = (os.environ.get("VMCELL_URL") or DEFAULT_URL).rstrip("/")
    token = os.environ.get("VMCELL_TOKEN") or ""
    path = vmcell_home() / "token"
    if not token and path.is_file():
        token = path.read_text().strip()
    if not token:
        report(True, f"server: not asked (no token in $VMCELL_TOKEN or {path})")
        return
    request = urllib.request.Request(f"{url}/health", headers={"Authorization": f"token {token}"})
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            health = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        report(False, f"server at {url} answers {exc.code} to the local token", "set VMCELL_TOKEN to its token",
               essential=False)
        return
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        report(True, f"server: none answers at {url} ({reason})")
        return
    report(True, f"server at {url}: vmcell {health.get('version')}, {health.get('sessions')} session(s), "
                 f"{str(health.get('accel', '?')).upper()}")
    if "templates" not in health:
        report(False, f"server at {url} does not say which template builds it serves (older vmcell)",
               "restart it with this version", essential=False)
    for name, served in sorted(health.get("templates", {}).items()):
        key, here = served.get("key"), planned.get(name)
        if not served.get("rebuild_pending") and (here is None or here.key == key):
            report(True, f"server serves template {name!r} build {key}: current")
            continue
        ready = here is not None and here.key != key and here.is_built()
        report(False, f"server serves template {name!r} build {key}: stale, its sources changed since the server "
                      "started" + (f" (build {here.key} is ready)" if ready else ""),
               ("restart the server" if ready else f"vmcell template build {name}, then restart the server"),
               essential=False)


# ---- template -----------------------------------------------------------------------------------


def cmd_template_build(args) -> int:
    from .templates import build_template
    from .vm import QemuBackend

    progress = Progress(total_steps=None)
    built = asyncio.run(build_template(args.name, QemuBackend(), progress, force=args.force))
    meta = built.meta
    print(f"template {args.name!r} ready: {built.directory}")
    print(f"  accelerator {meta['accel'].upper()}; timings {meta['timings']}")
    return 0


def cmd_template_list(args) -> int:
    from .templates import available_templates, builds_of, load_template, planned_template
    from .vm import QemuBackend

    backend = QemuBackend()
    for name in available_templates():
        spec = load_template(name)
        planned = asyncio.run(planned_template(spec, backend))
        builds = builds_of(name)
        if planned.is_built():
            state = f"built {planned.key}"
        elif builds:
            state = f"built {builds[0].name.rsplit('-', 1)[-1]}, sources changed since (rebuild pending)"
        else:
            state = "not built"
        print(f"{name:12} {spec.vcpus} vCPU, {spec.memory_mib} MiB, disk {spec.disk_mib} MiB  {spec.description}\n"
              f"{'':12} {state}")
    return 0


# ---- bench --------------------------------------------------------------------------------------


def _bench(args, run) -> dict | None:
    """Runs `run(progress)`, progress lines on stderr. With --json prints the result and returns None."""
    note = None if args.json else (lambda line: print(f"  {line}", file=sys.stderr))
    result = asyncio.run(run(note))
    if args.json:
        print(json.dumps(result))
        return None
    return result


def _print_stats(result: dict, rows, width: int = 32) -> None:
    for label, key in rows:
        s = result[key]
        worst = f"   max {s['max']:8.1f} ms" if "max" in s else ""
        print(f"  {label:{width}} p50 {s['p50']:8.1f} ms   p95 {s['p95']:8.1f} ms{worst}")


def cmd_bench_create(args) -> int:
    from .bench import bench_create

    result = _bench(args, lambda note: bench_create(args.runs, args.template, args.cold_runs, progress=note))
    if result:
        print(f"vmcell bench create: {args.runs} runs, template {args.template!r}, "
              f"accelerator {result['accel'].upper()}")
        _print_stats(result, (("cold boot -> first ping", "cold_boot_ms"),
                              ("snapshot restore -> first ping", "restore_ms")))
    return 0


def cmd_bench_exec(args) -> int:
    from .bench import bench_exec

    result = _bench(args, lambda note: bench_exec(args.runs, args.template, progress=note))
    if result:
        print(f"vmcell bench exec: {args.runs} runs on one warm session, template {args.template!r}, "
              f"accelerator {result['accel'].upper()}")
        _print_stats(result, (("1+1 (host-timed)", "simple_ms"), ("  kernel busy -> idle (guest)", "guest_simple_ms")))
        print(f"  {'  the rest (dispatch+link+host)':32} p50 {result['outside_busy_idle_ms']['p50']:8.1f} ms")
        _print_stats(result, (("1+1 in-guest client, no link", "in_guest_direct_ms"), ("matplotlib PNG cell", "png_ms"),
                              ("  the same, native ipykernel", "png_native_ms"),
                              ("kernel restart -> 1+1 answered", "restart_ms")))
        cpu = result["cpu_s_per_cell"]
        print(f"  PNG cell / native: {result['png_vs_native_p50']}x (p50)   CPU-s per cell: 1+1 {cpu['simple']}, "
              f"PNG {cpu['png']} (server + QEMU), native PNG {cpu['png_native']}")
    return 0


def cmd_bench_api(args) -> int:
    from .bench_api import bench_api

    result = _bench(args, lambda note: bench_api(args.runs, args.template, progress=note))
    if result:
        accel = result["accel"].upper()
        print(f"vmcell bench api: `{result['cell']}`, {args.runs} rounds after warm-up, one cell per column per "
              "round (interleaved)")
        _print_stats(result, ((f"vmcell REST POST /execute ({accel})", "vmcell_rest_ms"),
                              ("  of which the kernel round trip", "vmcell_rest_kernel_ms"),
                              (f"vmcell gateway websocket ({accel})", "vmcell_websocket_ms"),
                              ("jupyter_kernel_gateway, native kernel", "native_gateway_websocket_ms"),
                              ("native kernel, jupyter_client over ZMQ", "native_direct_ms")), width=40)
        print(f"  ipykernel {result['ipykernel_guest']} in the guest, {result['ipykernel_native']} native; "
              f"jupyter_kernel_gateway {result['jupyter_kernel_gateway']}; native kernel runs without a VM")
    return 0


def cmd_bench_containment(args) -> int:
    from .bench_containment import bench_containment

    result = _bench(args, lambda note: bench_containment(args.runs, args.cells, args.rounds, args.template,
                                                         progress=note))
    if result:
        print(f"vmcell bench containment: template {args.template!r}, accelerator {result['accel'].upper()}")
        _print_stats(result, [("restore, jailed (ms)", "restore_jailed_ms"),
                              ("restore, not jailed (ms)", "restore_unjailed_ms"),
                              ("1+1 alone (ms)", "quiet_alone_ms"),
                              ("1+1 beside a busy VM (ms)", "quiet_beside_busy_ms")])
        print(f"  neighbour ratio (p50 beside / alone): {result['neighbour_ratio_p50']}")
    return 0


def cmd_bench_lifecycle(args) -> int:
    from .bench_lifecycle import bench_lifecycle

    if args.sessions < 1 or args.idle_window <= 0:
        print("vmcell: --sessions must be at least 1 and --idle-window positive", file=sys.stderr)
        return 2
    result = _bench(args, lambda note: bench_lifecycle(args.sessions, args.template, args.runs, args.idle_window,
                                                       progress=note))
    if result:
        print(f"vmcell bench lifecycle: template {args.template!r}, accelerator {result['accel'].upper()}, "
              f"{result['runs']} runs per figure, pool of {result['pool_size']}")
        _print_stats(result, (("pool take (create from the pool)", "pool_take_ms"),
                              ("  its first cell (1 + 1)", "pool_first_cell_ms"),
                              ("  take -> first cell answered", "pool_take_to_first_cell_ms"),
                              ("restore from the template", "restore_ms"),
                              ("pause in memory (QMP stop)", "pause_ms"), ("resume from memory -> ping", "resume_ms"),
                              ("save to disk", "save_ms"), ("load from disk -> ping", "load_ms"),
                              ("fork, 1 child", "fork_ms"), ("fork, 8 children", "fork8_ms")), width=36)
        if result["pool_take_misses"]:
            print(f"  ({result['pool_take_misses']} pool takes found the pool short and restored instead)")
        print(f"  {result['sessions']} idle sessions, {result['idle_window_s']:g} s windows: CPU per session "
              f"{result['running_idle_cpu_pct_per_session']:.2f} % running, "
              f"{result['idle_cpu_pct_per_session']:.3f} % suspended; PSS {result['pss_mib_per_session']:.1f} MiB")
        best = result["max_idle_sessions"]
        if best is not None:
            print(f"  idle sessions this host holds: {best} ({result['max_idle_sessions_basis']}; limited by "
                  f"{result['max_idle_sessions_limited_by']}: {result['mem_available_mib']} MiB were available, "
                  f"{result['cores']} cores)")
    return 0


def cmd_bench_contexts(args) -> int:
    from .bench_contexts import bench_contexts

    result = _bench(args, lambda note: bench_contexts(args.runs, args.template, progress=note))
    if result:
        print(f"vmcell bench contexts: {args.runs} runs per language on one warm session, template "
              f"{args.template!r}, accelerator {result['accel'].upper()}")
        _print_stats(result, [(f"{lang} {label}", f"{lang}_{key}") for lang in ("python", "bash")
                              if f"{lang}_create" in result
                              for label, key in (("create_code_context", "create"), ("  first cell", "first_cell"),
                                                 ("  remove", "remove"))])
    return 0


def cmd_bench_ab(args) -> int:
    from .bench_ab import bench_ab

    result = _bench(args, lambda note: bench_ab(args.a, args.b, args.code, args.rounds, args.cells, args.template,
                                                progress=note))
    if result:
        print(f"vmcell bench ab: {result['rounds']} rounds of {result['cells_per_block']} cells each side, "
              f"interleaved; template {result['template']!r}, accelerator {result['accel'].upper()}")
        for side in ("a", "b"):
            s = result[side]
            print(f"  {side.upper()} {s['cpu_s_per_cell']:.4f} CPU-s/cell   cell p50 {s['cell_ms']['p50']:8.1f} ms "
                  f"p95 {s['cell_ms']['p95']:8.1f} ms   {s['checkout']}")
        print(f"  A - B per round: median {result['a_minus_b_median']} CPU-s/cell; B cheaper in "
              f"{result['b_cheaper_in']} rounds (load {result['load_avg'][0]})")
    return 0


def cmd_bench_load(args) -> int:
    from .bench_load import bench_load

    result = _bench(args, lambda note: bench_load(args.sessions, -(-args.cells // 3), args.template, progress=note))
    if result:
        print(f"vmcell bench load: template {result['template']!r}, accelerator {result['accel'].upper()}, "
              f"{result['rounds']} rounds of {'/'.join(result['mix'])} per session")
        for label, phase in (("1 session", result["single"]), (f"{result['loaded']['sessions']} sessions",
                                                               result["loaded"])):
            cell = phase["cell_ms"] or {"p50": float("nan"), "p95": float("nan")}
            print(f"  {label:12} {phase['cells_per_s']:7.2f} cells/s   cell p50 {cell['p50']:8.1f} ms "
                  f"p95 {cell['p95']:8.1f} ms   {phase['cpu_s_per_cell']} CPU-s/cell "
                  f"({phase['server_cpu_s_per_cell']} server)   "
                  f"create p50 {phase['create_ms']['p50']:.0f} ms p95 {phase['create_ms']['p95']:.0f} ms")
        print(f"  scaling_ratio {result['scaling_ratio']}   lost {result['lost']}   garbled {result['garbled']}")
    return 0 if result is None or (result["lost"] == 0 and result["garbled"] == 0) else 1


# ---- serve --------------------------------------------------------------------------------------


def parse_pool_spec(spec: str) -> tuple[str, int]:
    """`--pool N` (the default template) or `--pool NAME=N`: how many sessions to keep ready."""
    name, sep, count = spec.rpartition("=") if "=" in spec else ("", "", spec)
    name = name.strip() if sep else DEFAULT_TEMPLATE
    if sep and not name:
        raise argparse.ArgumentTypeError(f"{spec!r}: the template name before '=' is empty (want N or NAME=N)")
    try:
        number = int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: {count!r} is not a whole number (want N or NAME=N)") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{spec!r}: the pool size must be 0 or more")
    return name, number


def parse_seconds(text: str) -> float:
    """A duration flag: 0 or more seconds (0 turns the feature off)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r}: want 0 or more seconds")
    return value


class _PoolAction(argparse.Action):
    """Collects repeated --pool specs into {template: size}; the same template twice is an error."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        name, count = value
        pool = dict(getattr(namespace, self.dest) or {})
        if name in pool:
            parser.error(f"argument {option_string}: template {name!r} is given twice")
        pool[name] = count
        setattr(namespace, self.dest, pool)


def lifecycle_settings(args):
    """`vmcell serve`'s lifecycle flags as the manager takes them (sessions/settings.py)."""
    from .sessions.settings import LifecycleSettings

    return LifecycleSettings(
        pool={name: count for name, count in (args.pool or {}).items() if count > 0},
        auto_pause_s=args.auto_pause or None,  # 0 disables
        save_after_s=args.save_after or None,
        state_dir=None if args.ephemeral else Path(args.state_dir) if args.state_dir else state_dir(),
    )


def cmd_serve(args) -> int:
    from .server import serve
    from .templates import available_templates, build_template
    from .vm import QemuBackend

    lifecycle = lifecycle_settings(args)
    unknown = sorted(set(lifecycle.pool) - set(available_templates()))
    if unknown:
        print(f"vmcell: error: --pool names no template {', '.join(map(repr, unknown))} "
              f"(templates: {', '.join(available_templates()) or 'none'})", file=sys.stderr)
        return 2

    async def main() -> None:
        if not args.no_build:
            for name in dict.fromkeys([args.template, *lifecycle.pool]):  # builds only what is missing
                await build_template(name, QemuBackend(), Progress())
        await serve(args.host, args.port, args.token, max_sessions=args.max_sessions, lifecycle=lifecycle,
                    metrics_public=args.metrics_public)

    asyncio.run(main())
    return 0


# ---- run ----------------------------------------------------------------------------------------


def cmd_run(args) -> int:
    from .run import CellPrinter, run_cells_locally, run_cells_on_server

    if args.timeout is not None and args.timeout <= 0:
        print("vmcell: --timeout must be positive", file=sys.stderr)
        return 2
    cells = [sys.stdin.read() if code == "-" else code for code in args.code]
    env = {}
    for pair in args.env:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            print(f"vmcell: --env wants NAME=VALUE, got {pair!r}", file=sys.stderr)
            return 2
        env[name] = value
    printer = CellPrinter(Path(args.out_dir))
    if args.url:
        from .client import SandboxError

        try:
            run_cells_on_server(cells, printer, args.template, env, args.timeout, args.url, args.token)
        except (SandboxError, OSError) as exc:
            print(f"vmcell: error: server {args.url}: {exc}", file=sys.stderr)
            return 1
    else:
        asyncio.run(run_cells_locally(cells, printer, args.template, env, args.timeout, Progress()))
    return 1 if printer.failed else 0


# ---- mcp ----------------------------------------------------------------------------------------


def cmd_mcp(args) -> int:
    from .mcp_server import serve_stdio

    asyncio.run(serve_stdio(args.template, args.max_sessions, build=not args.no_build))
    return 0


# ---- shell --------------------------------------------------------------------------------------


def cmd_shell(args) -> int:
    """A session's guest, one shell command per line: the quickest look inside a vmcell microVM."""
    from .sessions import SessionManager
    from .templates import build_template
    from .vm import QemuBackend

    async def main() -> None:
        backend = QemuBackend()
        await build_template(args.template, backend, Progress())  # builds only what is missing
        async with SessionManager(backend) as manager:
            session = await manager.create(args.template)
            print(f"session {session.id} ({session.identity.hostname}) restored in {session.restore_ms:.0f} ms "
                  f"under {session.template.accel.name.upper()}; one shell command per line, Ctrl-D to end",
                  file=sys.stderr)
            loop = asyncio.get_running_loop()
            while True:
                if sys.stdin.isatty():
                    print(f"{session.identity.hostname}$ ", end="", flush=True, file=sys.stderr)
                line = await loop.run_in_executor(None, sys.stdin.readline)
                if not line:
                    break
                if not line.strip():
                    continue
                result = await session.run(["/bin/sh", "-c", line], timeout=args.timeout)
                sys.stdout.buffer.write(result.stdout)
                sys.stderr.buffer.write(result.stderr)
                sys.stdout.flush()
                if result.returncode:
                    print(f"[exit {result.returncode}{', timed out' if result.timed_out else ''}]", file=sys.stderr)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass  # the session manager has closed the VM on the way out
    return 0


# ---- main ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmcell", description="Code-interpreter sessions in microVMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="the HTTP server (REST API; token auth)")
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--token", default=None, help="default: generated once, kept in $VMCELL_HOME/token")
    p.add_argument("--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS)
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help="template to build first if missing")
    p.add_argument("--no-build", action="store_true", help="do not build the template first")
    p.add_argument("--pool", action=_PoolAction, type=parse_pool_spec, default={}, metavar="SPEC",
                   help=f"keep sessions restored and ready: N (template {DEFAULT_TEMPLATE!r}) or NAME=N; repeatable")
    p.add_argument("--auto-pause", type=parse_seconds, default=DEFAULT_AUTO_PAUSE_S, metavar="SECONDS",
                   help=f"stop a session's VM after this long unused (default {DEFAULT_AUTO_PAUSE_S:g}; 0: never)")
    p.add_argument("--save-after", type=parse_seconds, default=None, metavar="SECONDS",
                   help="save a paused session to disk (freeing its RAM) after this long paused (default: never)")
    p.add_argument("--metrics-public", action="store_true", help="serve /metrics without the token")
    durable = p.add_mutually_exclusive_group()
    durable.add_argument("--state-dir", default=None, metavar="PATH",
                         help="where sessions are kept so that they outlive the server: a restart on the "
                              "same directory serves them again (default: $VMCELL_HOME/sessions)")
    durable.add_argument("--ephemeral", action="store_true",
                         help="keep no registry: sessions end with the server")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("run", help="run cells in a fresh session and print what they output",
                       description="Runs each CODE as a cell, in order, in one fresh session; stops at the first "
                                   "error (exit status 1). Images are written to files and their paths printed.")
    p.add_argument("code", nargs="+", metavar="CODE", help="a cell's code; - reads one from standard input")
    p.add_argument("--template", default=DEFAULT_TEMPLATE)
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="session environment variable")
    p.add_argument("--timeout", type=float, default=None, help="per-cell timeout in seconds")
    p.add_argument("--out-dir", default=".", help="where images go (output-N.png, never overwriting)")
    p.add_argument("--url", default=None, help="run on this vmcell server instead of a VM started here")
    p.add_argument("--token", default=None, help="the server's token (default: $VMCELL_TOKEN, $VMCELL_HOME/token)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("mcp", help="an MCP server on stdin/stdout (tools: run_code, files, commands, sessions)",
                       description="Serves vmcell's MCP tools over stdio to one MCP client (Claude Desktop, an "
                                   "agent): sessions are VMs started by this process, closed when the client "
                                   "goes away (EOF), on SIGTERM or Ctrl-C. Logs go to stderr.")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help="the template new sessions start from")
    p.add_argument("--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS)
    p.add_argument("--no-build", action="store_true", help="do not build the template first if missing")
    p.set_defaults(func=cmd_mcp)

    p = sub.add_parser("doctor", help="check qemu, the accelerator, images and templates; say how to fix gaps")
    p.set_defaults(func=cmd_doctor)

    template = sub.add_parser("template", help="build and list templates").add_subparsers(dest="action", required=True)
    p = template.add_parser("build", help="build images, boot, warm up and snapshot a template")
    p.add_argument("name", nargs="?", default=DEFAULT_TEMPLATE)
    p.add_argument("--force", action="store_true", help="rebuild the snapshot even if it is up to date")
    p.set_defaults(func=cmd_template_build)
    p = template.add_parser("list", help="templates and whether they are built")
    p.set_defaults(func=cmd_template_list)

    bench = sub.add_parser("bench", help="measure latencies on this machine").add_subparsers(dest="what", required=True)
    p = bench.add_parser("create", help="cold boot vs snapshot restore, each to the first answered ping")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--cold-runs", type=int, default=None, help="cold boots to time (default: --runs)")
    p.add_argument("--template", default=DEFAULT_TEMPLATE)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench_create)

    p = bench.add_parser("exec", help="cell round trips on a warm session: 1+1 and a matplotlib PNG")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--template", default=DEFAULT_TEMPLATE)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench_exec)

    p = bench.add_parser("api", help="1+1 over REST and the gateway websocket, beside jupyter_kernel_gateway "
                                     "on a native kernel")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--template", default=DEFAULT_TEMPLATE)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench_api)

    p = bench.add_parser("load", help="cells/s from 1 session and from N at once (scaling), CPU-seconds per cell")
    p.add_argument("--sessions", type=int, default=20, help="concurrent sessions in the loaded phase")
    p.add_argument("--cells", type=int, default=15,
                   help="cells per session, run as rounds of the mix: a trivial, a pandas and a plot cell")
    p.add_argument("--template", default=DEFAULT_TEMPLATE)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench_load)

    p = bench.add_parser("lifecycle", help="pool take, restore, pause/resume, save/load, fork; idle CPU and "
                                           "memory per session, and how many idle sessions this host holds")
    p.add_argument("--sessions", type=int, default=50, help="sessions to hold idle for the density figures")
    p.add_argument("--runs", type=int, default=10, help="samples per latency figure")
    p.add_argument("--idle-window", type=float, default=10.0, metavar="SECONDS",
                   help="how long CPU use is read for")
    p.add_argument("--template", default=DEFAULT_TEMPLATE)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench_lifecycle)

    p = bench.add_parser("containment", help="restore with and without the QEMU jail (interleaved), and a quiet "
                                             "session's 1+1 beside one whose vCPUs are pinned at 100 %%")
    p.add_argument("--runs", type=int, default=10, help="restores of each kind")
    p.add_argument("--cells", type=int, default=20, help="1+1 cells per neighbour phase")
    p.add_argument("--rounds", type=int, default=3, help="alone/beside-busy rounds")
    p.add_argument("--template", default=DEFAULT_TEMPLATE)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench_containment)

    p = bench.add_parser("contexts", help="create_code_context for python and bash (a kernel forked from the "
                                          "guest's warm fork server), its first cell, its removal")
    p.add_argument("--runs", type=int, default=10, help="contexts made per language")
    p.add_argument("--template", default=DEFAULT_TEMPLATE)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench_contexts)

    p = bench.add_parser("ab", help="two checkouts against each other in one run, interleaved: CPU-s per cell "
                                    "and the paired difference (e.g. before and after a change)")
    p.add_argument("a", type=Path, help="checkout A, e.g. `git worktree add /tmp/vmcell-before <commit>`")
    p.add_argument("b", type=Path, nargs="?", default=REPO_ROOT, help="checkout B (default: this one)")
    p.add_argument("--code", default="1+1", help="the cell (default 1+1)")
    p.add_argument("--rounds", type=int, default=12, help="A/B block pairs, alternating which goes first")
    p.add_argument("--cells", type=int, default=10, help="cells per block")
    p.add_argument("--template", default=DEFAULT_TEMPLATE)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench_ab)

    p = sub.add_parser("shell", help="start a session and run shell commands in its guest, one per line")
    p.add_argument("--template", default=DEFAULT_TEMPLATE)
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(func=cmd_shell)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if getattr(args, "runs", 1) is not None and getattr(args, "runs", 1) < 1:
        print("vmcell: --runs must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except VmcellError as exc:
        print(f"vmcell: error: {exc}", file=sys.stderr)
        for note in getattr(exc, "__notes__", ()):
            print(note, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
