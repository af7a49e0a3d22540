"""The command line: convert, inspect and sample. Every failure is one line on stderr and a non-zero exit;
--debug adds the traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from convert import __version__
from convert.common.errors import ConvertError, escape
from convert.common.sizes import format_size, parse_size
from convert.fileio.signals import SIGNALS, signals_stop_the_run
from convert.fileio.workers import Interrupted, run_scope
from convert.verify.report import Report

# Only what verify needs to start is imported here: planning and writing import every container (numpy,
# gguf-py), a tenth of a second or more that verify of a small folder would lose to a bare SHA-256 of it (its
# target, bench/verify-floor.md). convert and inspect import them where they begin.
if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

    from convert.planning.plan import Plan

log = logging.getLogger("mixtral-convert")

EXIT_PROBLEMS = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 3


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mixtral-convert", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser(
        "convert",
        help="convert a checkpoint folder to another layout",
        options=_convert_options,
        details=_convert_details,
    )

    verify = commands.add_parser("verify", help="check a folder: checksums, format rules, names and shapes")
    verify.add_argument("path", type=Path)
    verify.add_argument("--against", type=Path, metavar="SRC", help="also check every tensor against this source")
    verify.add_argument("--expect", metavar="PINS", help="a sha256sum/md5sum file (or a shipped pins name)")
    verify.add_argument("--json", action="store_true", help="print one JSON report")

    commands.add_parser(
        "inspect", help="describe a checkpoint folder and the problems found in it", options=_inspect_options
    )

    sample = commands.add_parser("sample", help="write a tiny random Mixtral in the torrent layout")
    sample.add_argument("dst", type=Path)
    sample.add_argument("--seed", type=int, default=0)
    return parser


def _convert_details(convert: argparse.ArgumentParser) -> None:
    """What --outtype and --group-size take, per target, for convert's help (every container is imported)."""
    from convert.containers import format_of
    from convert.model.tables import layout, target_names

    formats = {name: format_of(layout(name)) for name in target_names()}
    actions = {action.dest: action for action in convert._actions}
    outtypes = {name: f.outtypes for name, f in formats.items() if f.outtypes}
    actions["outtype"].metavar = "{" + ",".join(sorted({o for values in outtypes.values() for o in values})) + "}"
    actions["outtype"].help = (
        "element type of the output, for "
        + ", ".join(f"--to {name} ({'|'.join(values)})" for name, values in outtypes.items())
        + " (default: the source's; no other layout converts elements)"
    )
    # A quantized outtype with another group than its default is spelled OUTTYPE-gN (Format.outtype_variants).
    groups = {name: f.outtype_variants for name, f in formats.items() if f.outtype_variants}
    sizes = sorted({int(v.rpartition("-g")[2]) for values in groups.values() for v in values})
    actions["group_size"].metavar = "{" + ",".join(map(str, sizes)) + "}"
    actions["group_size"].help = (
        f"with a quantized --outtype, its quantization group, for {', '.join(f'--to {name}' for name in groups)} "
        "(default: the layout's own)"
    )


def _inspect_options(inspect: argparse.ArgumentParser) -> None:
    """inspect's arguments: --from lists the layouts, which reads the mapping tables (_convert_options)."""
    from convert.model.tables import layout_names

    inspect.add_argument("path", type=Path)
    inspect.add_argument("--from", dest="source_layout", choices=layout_names(), help="layout (default: detected)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")


def _convert_options(convert: argparse.ArgumentParser) -> None:
    """convert's arguments. The layouts' names read the mapping tables: they are added when convert is the command
    or its help is shown (_Parser), not for verify, whose hashing starts before any of that is imported
    (convert/verify/folder.py). What --outtype and --group-size take is each container's own, and asking every
    container imports them all (gguf-py, with yaml, a tenth of a second on a cold cache before a conversion's first
    byte moves): planning checks the values against the target's container, and only the help lists them all
    (_convert_details)."""
    from convert.model.tables import layout_names, target_names

    layouts = layout_names()
    convert.add_argument("src", type=Path, help="source checkpoint folder")
    convert.add_argument("dst", type=Path, help="output folder (created; must be empty unless --force)")
    convert.add_argument("--to", required=True, choices=target_names(), help="target layout")
    convert.add_argument("--from", dest="source_layout", choices=layouts, help="source layout (default: detected)")
    convert.add_argument("--outtype", help="element type of the output (default: the source's)")
    convert.add_argument("--group-size", type=int, help="with a quantized --outtype, its quantization group")
    convert.add_argument(
        "--max-shard-size",
        type=_size,
        metavar="SIZE",
        help="largest shard or split file: 5GB (10^9), 5GiB (2^30) or bytes (default: the layout's own; hf 5GB)",
    )
    convert.add_argument(
        "--dry-run", action="store_true", help="write nothing, print the plan (reads metadata only, unless --expect)"
    )
    convert.add_argument("--json", action="store_true", help="with --dry-run: print the plan as one JSON object")
    convert.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    convert.add_argument("--resume", action="store_true", help="continue an interrupted conversion into DST")
    convert.add_argument(
        "--hash-input", action="store_true", help="also record the SHA-256 of every source file in manifest.json"
    )
    convert.add_argument(
        "--no-checksums",
        dest="checksums",
        action="store_false",
        help="write no SHA256SUMS or manifest.json and hash nothing (faster; --resume then trusts file sizes)",
    )
    convert.add_argument("--strict", action="store_true", help="treat warnings about tensors as errors")
    convert.add_argument(
        "--instruct", action="store_true", help="hf: add the Mixtral-Instruct chat template to tokenizer_config.json"
    )
    convert.add_argument("--no-progress", action="store_true", help="no progress bar (also off when not a terminal)")
    convert.add_argument(
        "--quiet", action="store_true", help="print errors only: no warnings, progress bar or summary line"
    )

    convert.add_argument(
        "--expect",
        metavar="PINS",
        help="check the source files against a sha256sum/md5sum file (or a shipped pins name) first",
    )


def run_convert(args: argparse.Namespace) -> int:
    from convert.planning.plan import PlanOptions, build_plan
    from convert.planning.source import open_source
    from convert.run.pipeline import convert_checkpoint

    if args.json and not args.dry_run:
        raise ConvertError("--json goes with --dry-run")
    if args.hash_input and not args.checksums:
        raise ConvertError("--hash-input records hashes in manifest.json, which --no-checksums does not write")
    if args.resume and args.force:
        raise ConvertError("--resume continues a run and --force starts over: choose one")
    if args.group_size is not None and args.outtype is None:
        raise ConvertError("--group-size goes with a quantized --outtype")
    options = PlanOptions(
        max_shard_size=args.max_shard_size,
        hash_input=args.hash_input,
        instruct=args.instruct,
        strict=args.strict,
        checksums=args.checksums,
        outtype=args.outtype if args.group_size is None else f"{args.outtype}-g{args.group_size}",
    )
    if args.expect:  # a dry run too: the pins are what the user asked to check (this reads every source byte)
        pins = check_pins_or_fail(args.src, args.expect)
        log.info("source matches %s", pins)
    if args.dry_run:
        with open_source(args.src, args.source_layout) as source:
            plan = build_plan(source, args.to, options)
            description = plan.describe()
        if args.json:
            print(json.dumps(description, indent=2))
        else:
            print(
                f"{description['source']['layout']} -> {description['target']}, {description['dtype']}"
                + (f" as {description['outtype']}" if description["outtype"] else "")
                + f", {description['tensors']} tensors, nothing written"
            )
            for entry in description["files"]:
                print(f"  {entry['size']:>16,}  {args.dst / entry['name']}")
        return 0
    if args.quiet:
        log.setLevel(logging.ERROR)
    started, clock = time.time_ns(), time.monotonic()
    plan = convert_checkpoint(
        args.src,
        args.dst,
        args.to,
        options,
        source_layout=args.source_layout,
        force=args.force,
        resume=args.resume,
        progress=not args.no_progress and not args.quiet and sys.stderr.isatty(),
    )
    if plan.kept_complete:
        if not args.quiet:
            shown = escape(str(args.dst))
            print(
                f"nothing to do: {shown} already holds the complete output of this conversion (its files, sizes, "
                f"index and manifest match; the weights were not read: `mixtral-convert verify {shown} --against "
                f"{escape(str(args.src))}` checks every byte)"
            )
        return 0
    if not args.quiet:
        print(_summary(plan, args.dst, started, time.monotonic() - clock, resumed=args.resume))
    return 0


def _summary(plan: Plan, dst: Path, started_ns: int, seconds: float, *, resumed: bool) -> str:
    """The line a finished conversion ends with: what was written, how fast, and how to check it. A resumed run
    counts only the files it wrote itself (those modified since it started), as its throughput must."""
    files = [dst / f.name for f in plan.files]
    if resumed:
        files = [path for path in files if path.stat().st_mtime_ns >= started_ns]
    size = sum(path.stat().st_size for path in files)
    rate = f"{format_size(int(size / seconds))}/s" if seconds > 0 else "-"
    shown = escape(str(dst))
    line = f"wrote {len(files)} files, {format_size(size)} ({size:,} bytes) to {shown} in {seconds:.1f} s ({rate})"
    if resumed and len(files) < len(plan.files):  # --resume with nothing to resume was a plain run: no such clause
        line += f"; {len(plan.files) - len(files)} files were kept from the interrupted run"
    if plan.options.checksums:
        return f"{line}; check them with `cd {shown} && sha256sum -c SHA256SUMS` or `mixtral-convert verify {shown}`"
    return f"{line}; no SHA256SUMS (--no-checksums): `mixtral-convert verify {shown}` checks the structure"


def run_inspect(args: argparse.Namespace) -> int:
    from convert.containers import format_of
    from convert.planning.plan import check_source
    from convert.planning.source import open_source

    with open_source(args.path, args.source_layout) as source:
        checks = format_of(source.layout).check_records(source.records.values())
        problems = [p.line() for p in [*check_source(source), *checks]]
        dtypes = Counter(r.dtype for r in source.records.values())
        report = {
            "folder": str(source.folder),
            "layout": source.layout.name,
            "description": source.layout.description,
            "files": [str(p) for p in source.weight_files],
            "params": vars(source.params),
            "tensors": len(source.records),
            "dtypes": dict(dtypes),
            "total_bytes": sum(r.nbytes for r in source.records.values()),
            "tokenizer": str(source.tokenizer) if source.tokenizer else None,
            "problems": problems,
        }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['folder']}: {report['layout']} ({report['description']})")
        print("  params: " + ", ".join(f"{k}={v}" for k, v in report["params"].items()))
        print(f"  tensors: {report['tensors']}, dtypes: {report['dtypes']}, total bytes: {report['total_bytes']:,}")
        print(f"  tokenizer: {report['tokenizer'] or 'none'}")
        print(f"  problems: {len(problems) or 'none'}")
        for problem in problems:
            print(f"    {problem}")
    return EXIT_PROBLEMS if problems else 0


def check_pins_or_fail(folder: Path, name: str) -> Traversable:
    from convert.verify.pins import check_pins, resolve_pins

    pins = resolve_pins(name)
    report = Report(str(folder))
    check_pins(folder, pins, report)
    failed = [r for r in report.results if not r.ok]
    if failed:
        raise ConvertError(f"{failed[0].problem} (pins {pins})", file=failed[0].file)
    return pins


def run_verify(args: argparse.Namespace) -> int:
    pins = None
    if args.expect:  # package data (importlib.resources): loaded only when asked for
        from convert.verify.pins import resolve_pins

        pins = resolve_pins(args.expect)
    from convert.verify.folder import verify_folder  # its hashing lanes: no other command needs them

    report = verify_folder(args.path, against=args.against, pins=pins)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        for result in report.results:
            if not result.ok:
                print(result.line())
        for note in report.notes:
            print(f"note: {escape(note)}")
        passed = sum(r.ok for r in report.results)
        verdict = "verified" if report.ok else "FAILED"
        layout = report.layout or "unknown layout"
        print(f"{verdict}: {escape(str(args.path))} ({layout}), {passed} of {len(report.results)} checks passed")
    return 0 if report.ok else EXIT_PROBLEMS


def run_sample(args: argparse.Namespace) -> int:
    from convert.run.destination import check_destination
    from convert.sample import write_sample  # learns the tokenizer's merges; no other command needs it

    check_destination(args.dst, None)
    if args.dst.exists() and any(args.dst.iterdir()):
        raise ConvertError("the output folder is not empty", file=args.dst)
    write_sample(args.dst, args.seed)
    print(f"wrote a tiny torrent-layout sample to {args.dst}")
    return 0


class _LowercaseLevel(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"mixtral-convert: {record.levelname.lower()}: {record.getMessage()}"


class UsageError(Exception):
    """A command line argparse refuses (it would print the usage and exit 2 on its own)."""


class _Parser(argparse.ArgumentParser):
    """argparse's parser with one error path (UsageError), and arguments that can wait: `options` adds them the
    first time the parser parses or shows its usage or help (a subcommand's parser parses only when it is the
    command), and `details` completes their help texts when the help is shown."""

    def __init__(
        self,
        *args: Any,
        options: Callable[[argparse.ArgumentParser], None] | None = None,
        details: Callable[[argparse.ArgumentParser], None] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self._options, self._details = options, details

    def _with_options(self) -> None:
        if self._options is not None:
            add, self._options = self._options, None
            add(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._with_options()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._with_options()
        return super().format_usage()

    def format_help(self) -> str:
        self._with_options()
        if self._details is not None:
            complete, self._details = self._details, None
            complete(self)
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise UsageError(f"{self.prog}: error: {message}")


def _json_failure(command: str | None, path: object, line: str, code: int) -> str:
    """What --json prints when the command fails before its own JSON: an object with ok false and the error's
    line and exit status (verify's has the report's fields too, empty), so a script reading stdout always gets
    JSON. The line goes to stderr as for every failure."""
    failed: dict[str, object] = {"ok": False, "error": {"line": line, "exit": code}}
    if command == "verify":
        failed = Report(str(path)).as_dict() | failed
    return json.dumps(failed, indent=2)


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        if "--json" in words:
            command = next((w for w in words if w in ("convert", "verify", "inspect")), None)
            print(_json_failure(command, None, str(exc), EXIT_ERROR))
        return EXIT_ERROR
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LowercaseLevel())
    level = log.level  # put back at the end, with the handler: main() may run inside a longer-lived program
    log.addHandler(handler)
    log.setLevel(logging.INFO if args.debug else logging.WARNING)
    commands = {"convert": run_convert, "inspect": run_inspect, "verify": run_verify, "sample": run_sample}
    # Handlers can only be set from the main thread. When the run is over its outcome stands: as a command, a
    # late signal is ignored rather than killing the process during the interpreter's exit (which resets handlers
    # to the default); inside another program, that program's handlers come back.
    signals = nullcontext()
    if threading.current_thread() is threading.main_thread():
        signals = signals_stop_the_run(_after_the_run)
    try:
        with run_scope(), signals:
            return commands[args.command](args)
    except (Interrupted, KeyboardInterrupt):
        line = f"mixtral-convert: interrupted; {_what_was_interrupted(args, argv)}"
        print(line, file=sys.stderr)
        if getattr(args, "json", False):
            print(_json_failure(args.command, getattr(args, "path", None), line, EXIT_INTERRUPTED))
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.debug:
            raise
        line, code = _one_line(exc)
        print(line, file=sys.stderr)
        if getattr(args, "json", False):
            print(_json_failure(args.command, getattr(args, "path", None), line, code))
        return code
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


_as_command = False  # set by entry(): main() runs as the process itself, not inside another program


def _after_the_run(signum: int, before: object) -> None:
    signal.signal(signum, signal.SIG_IGN if _as_command else before)  # type: ignore[arg-type]


def entry() -> None:
    """The console script: main(), then exit even if some thread is stuck (none should be: all are daemons)."""
    global _as_command
    _as_command = True
    try:
        code = main()
    finally:  # also when argparse exits (--help, --version, a usage error) before main() took the signals over
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
    sys.stdout.flush()
    sys.stderr.flush()
    if code != 0 or any(not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        # A failed run has said its one line and left its files as --resume expects: the interpreter's teardown
        # (module cleanup, a thread still finishing a disk call) would only delay the exit the user waits for.
        os._exit(code)
    raise SystemExit(code)


def _what_was_interrupted(args: argparse.Namespace, argv: list[str] | None) -> str:
    """The rest of the interrupt line: what state the command left behind, and how to go on."""
    if args.command == "convert" and args.dry_run:
        return "a dry run writes nothing"
    if args.command == "convert":
        from convert.run.resume import JOURNAL

        if not (args.dst / JOURNAL).is_file():
            return "nothing was written"
        words = [w for w in (sys.argv[1:] if argv is None else argv) if w != "--force"]
        words = ["mixtral-convert", *words, *([] if "--resume" in words else ["--resume"])]
        import shlex

        again = shlex.join(words)
        how = f"continue with: {again}" if again.isprintable() else "run the same command again with --resume"
        return f"the output is incomplete (no index or params written); {how}"
    if args.command == "sample":
        return f"the sample in {escape(str(args.dst))} is incomplete"
    return f"{args.command} did not finish; it changes nothing, run it again"


def _one_line(exc: Exception) -> tuple[str, int]:
    """The one stderr line and the exit status for a failure: bad input is an error, anything else a bug."""
    if isinstance(exc, ConvertError):
        return f"mixtral-convert: error: {exc.line()}", EXIT_ERROR
    if isinstance(exc, OSError):
        where = f"{escape(str(exc.filename))}: " if exc.filename else ""
        return f"mixtral-convert: error: {where}{escape(str(exc.strerror or exc))}", EXIT_ERROR
    if isinstance(exc, RecursionError):
        return "mixtral-convert: error: input nested too deeply to read", EXIT_ERROR
    detail = escape(f"{type(exc).__name__}: {exc}")
    return f"mixtral-convert: internal error: {detail} (rerun with --debug for the traceback)", EXIT_INTERNAL
