"""`modelgw job run` and the `modelgw stream` group (its commands are the stream runner's).

    modelgw job run -f job.yaml                                  # standalone: a Job document
    modelgw job run --name nightly --etcd 127.0.0.1:2379 [--prefix /modelgw/v1/]
                                                                 # the registry's JobSpec; status written there

Standalone, an IN_PROCESS job finds its model's URI and runtime kind in the registry when
--etcd is given, or from --model-uri and --runtime-kind. Exit codes are pipelines/jobs.py's:
0 succeeded, 1 failed (status FAILED; also a bad spec or file), 3 interrupted or the model
unreachable (run it again: it resumes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from modelgw.registry.keys import DEFAULT_PREFIX

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    job = subparsers.add_parser("job", help="run a batch inference job (a table in, predictions out)",
                                description="Models as jobs: score a JSONL or Parquet table through the gateway or "
                                            "in process, resumably, writing the outputs beside the input's row ids.")
    job_commands = job.add_subparsers(dest="job_command", metavar="COMMAND", required=True)
    run = job_commands.add_parser(
        "run", help="run one job to its end (resuming from its output's checkpoint)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("-f", "--file", type=Path, help="a Job document (YAML or JSON: kind: Job, spec: ...)")
    source.add_argument("--name", help="the job's name in the registry (with --etcd)")
    run.add_argument("--etcd", default=None, help="etcd endpoint HOST:PORT: read the job there (--name) and write its status")
    run.add_argument("--prefix", default=DEFAULT_PREFIX, help="registry key prefix (default %(default)s)")
    run.add_argument("--model-uri", default="", help="IN_PROCESS without a registry: the model version's URI")
    run.add_argument("--runtime-kind", default="", help="IN_PROCESS without a registry: its runtime kind (pytorch, onnx, ...)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")
    run.set_defaults(func=job_run)

    stream = subparsers.add_parser("stream", help="run a stream consumer (a topic in, results out)",
                                   description="Models on streams: consume Kafka or NATS JetStream, infer, produce.")
    # the stream runner's commands (`stream run`) are added to this group
    stream_commands = stream.add_subparsers(dest="stream_command", metavar="COMMAND", required=True)
    register_stream(stream_commands)


def register_stream(commands: argparse._SubParsersAction) -> None:
    """The `modelgw stream` commands (pipelines/streams.py's)."""
    from modelgw.pipelines import streams

    run = commands.add_parser("run", help="run one replica of a stream until SIGTERM (then drain)",
                              description=streams.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    streams.add_run_arguments(run)


def _read_job_file(path: Path) -> Any:
    from modelgw.registry.errors import ValidationError
    from modelgw.registry.files import parse_documents
    from modelgw.registry.validation import check_job

    try:
        text = path.read_text()
    except OSError as exc:
        raise ValidationError(f"{path}: {exc.strerror}") from None
    documents = [d for d in parse_documents(text, str(path)) if d.kind == "Job"]
    if len(documents) != 1:
        raise ValidationError(f"{path}: expected exactly one document of kind Job, found {len(documents)}")
    check_job(documents[0].spec)
    return documents[0].spec


async def _job_main(args: argparse.Namespace) -> int:
    from modelgw.pipelines.caller import LocalModel
    from modelgw.pipelines.jobs import EXIT_FAILED, EXIT_RETRY, run_job
    from modelgw.protos import registry_pb2 as rpb
    from modelgw.registry.errors import NotFoundError, RegistryError, UnavailableError
    from modelgw.registry.store import RegistryStore

    store = RegistryStore(args.etcd, prefix=args.prefix) if args.etcd else None
    try:
        try:
            if args.file is not None:
                spec = _read_job_file(args.file)
            else:
                if store is None:
                    print("modelgw job run: --name needs --etcd (the registry that holds the job)", file=sys.stderr)
                    return EXIT_FAILED
                spec = (await store.get_job(args.name)).spec
        except NotFoundError as exc:
            print(f"modelgw job run: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except UnavailableError as exc:
            print(f"modelgw job run: {exc}", file=sys.stderr)
            return EXIT_RETRY
        except RegistryError as exc:
            print(f"modelgw job run: {exc}", file=sys.stderr)
            return EXIT_FAILED
        local = None
        if spec.model.mode == rpb.ModelCall.IN_PROCESS and (args.model_uri or args.runtime_kind):
            if not (args.model_uri and args.runtime_kind):
                print("modelgw job run: --model-uri and --runtime-kind go together", file=sys.stderr)
                return EXIT_FAILED
            local = LocalModel(spec.model.model, spec.model.version or "1", args.runtime_kind, args.model_uri)
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None:
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            # standalone (-f) the registry only resolves an IN_PROCESS model: status is
            # written only for a job read from it
            outcome = await run_job(spec, store=store, report_status=args.file is None, local=local,
                                    show_progress=not args.no_progress)
        except asyncio.CancelledError:
            log.warning("job %s: stopped by SIGTERM; running it again resumes from its checkpoint", spec.name)
            return EXIT_RETRY
        finally:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signal.SIGTERM)
        if outcome.exit_code and outcome.status.message:
            print(f"modelgw job run: jobs/{spec.name}: {outcome.status.message}", file=sys.stderr)
        return outcome.exit_code
    finally:
        if store is not None:
            await store.close()


def job_run(args: argparse.Namespace) -> int:
    return asyncio.run(_job_main(args))
