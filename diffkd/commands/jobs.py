"""`diffkd submit -- diffkd <command...>` and `diffkd jobs list|status|logs|stop`: run on a Ray cluster."""
from __future__ import annotations

import argparse
import sys
import time

from diffkd.commands import UserError
from diffkd.runtime import jobs
from diffkd.runtime.jobs import JobsError

SUBMIT_EPILOG = """\
examples:
  diffkd submit --address http://HEAD:8265 -- diffkd train teacher --dataset s3://bucket/ds --out s3://bucket/run1
  diffkd submit --env RAY_DATA_VERBOSE=1 --num-cpus 1 --no-wait -- diffkd tune kd --config configs/paper.yaml
  diffkd jobs logs --follow diffkd-train-teacher-20250101-120000-a1b2c3

The cluster address comes from --address or RAY_ADDRESS, the token (for clusters started with
RAY_AUTH_MODE=token) from --token, RAY_AUTH_TOKEN or the file RAY_AUTH_TOKEN_PATH names. Data and
outputs must be on storage every node can read (a shared mount or s3:// / gs://): the job package
carries code only.
"""


def _add_connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="the head's Jobs API / dashboard URL, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
    parser.add_argument("--token", default=None,
                        help="Ray auth token for token-authenticated clusters (default: $RAY_AUTH_TOKEN)")


def register(subparsers) -> None:
    submit = subparsers.add_parser(
        "submit", help="submit a diffkd command to a Ray cluster as a job",
        description="Submit a command (normally `diffkd ...`) to a Ray cluster through the Jobs API.",
        epilog=SUBMIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_connection_args(submit)
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job (repeatable)")
    code = submit.add_mutually_exclusive_group()
    code.add_argument("--working-dir", default=None,
                      help="code to upload (default: this diffkd's project root)")
    code.add_argument("--image", default=None,
                      help="container image with diffkd installed (runtime_env image_uri; nothing is uploaded)")
    submit.add_argument("--pip", action="append", default=[], metavar="REQ",
                        help="extra pinned pip requirement for the job's environment (repeatable)")
    submit.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="gitignore-style pattern to keep out of the job package (repeatable)")
    submit.add_argument("--include", action="append", default=[], metavar="PATH",
                        help="a file or folder of the working dir to add to the package (repeatable); by default "
                             "only diffkd/, configs/, tune_spaces/ and the packaging files travel, and in folders "
                             "only code and config files (.py, .yaml, .toml, .json, ...)")
    submit.add_argument("--num-cpus", type=float, default=None, help="CPUs reserved for the job's driver")
    submit.add_argument("--num-gpus", type=float, default=None, help="GPUs reserved for the job's driver")
    submit.add_argument("--submission-id", default=None, help="job id to use (default: a unique readable one)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    submit.add_argument("job_command", nargs=argparse.REMAINDER,
                        help="after `--`: the command to run, e.g. -- diffkd train teacher ...")
    submit.set_defaults(handler=run_submit)

    jobs = subparsers.add_parser("jobs", help="list, inspect, follow or stop jobs on a Ray cluster")
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text in (("list", "all jobs on the cluster"), ("status", "a job's status"),
                            ("logs", "a job's logs"), ("stop", "stop a job")):
        action = actions.add_parser(name, help=help_text)
        _add_connection_args(action)
        if name != "list":
            action.add_argument("job_id")
        if name == "logs":
            action.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        if name == "stop":
            action.add_argument("--wait", action="store_true", help="wait until the job has stopped")
    jobs.set_defaults(handler=run_jobs)


def _client(args):
    return jobs.connect(args.address, args.token)


def _user_errors(fn):
    def wrapped(args):
        try:
            return fn(args)
        except JobsError as err:
            raise UserError(str(err)) from None
    return wrapped


@_user_errors
def run_submit(args) -> int:
    command = args.job_command[1:] if args.job_command[:1] == ["--"] else args.job_command
    spec = jobs.JobSpec(command=command, working_dir=args.working_dir, excludes=args.exclude,
                        include=args.include, env=jobs.parse_env(args.env), pip=args.pip, image=args.image,
                        num_cpus=args.num_cpus, num_gpus=args.num_gpus, submission_id=args.submission_id)
    spec.entrypoint()  # a missing command is an error before anything is packaged or sent
    client = _client(args)
    job_id = jobs.submit(client, spec)
    print(job_id, flush=True)
    if args.no_wait:
        return 0
    print(f"[diffkd] following {job_id}; Ctrl-C detaches (the job keeps running; "
          f"reattach with `diffkd jobs logs --follow {job_id}`)", file=sys.stderr, flush=True)
    try:
        final = jobs.follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\n[diffkd] detached; {job_id} keeps running", file=sys.stderr)
        return 130
    print(f"[diffkd] job {job_id} {final}", file=sys.stderr)
    return 0 if final == "SUCCEEDED" else 1


@_user_errors
def run_jobs(args) -> int:
    client = _client(args)
    if args.action == "list":
        rows = jobs.list_jobs(client)
        print(f"{'JOB ID':<48} {'STATUS':<10} {'STARTED':<19} ENTRYPOINT")
        for job in rows:
            started = _time(job.start_time)
            print(f"{job.submission_id or job.job_id or '-':<48} {job.status.value:<10} {started:<19} "
                  f"{job.entrypoint[:80]}")
        return 0
    if args.action == "status":
        job = jobs.info(client, args.job_id)
        print(f"{args.job_id}: {job.status.value}")
        if job.message:
            print(job.message)
        print(f"started {_time(job.start_time)}, ended {_time(job.end_time)}")
        return 0
    if args.action == "logs":
        if args.follow:
            final = jobs.follow(client, args.job_id)
            print(f"[diffkd] job {args.job_id} {final}", file=sys.stderr)
            return 0 if final == "SUCCEEDED" else 1
        sys.stdout.write(jobs.logs(client, args.job_id))
        return 0
    stopped = jobs.stop(client, args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'was not running'}")
    if args.wait:
        print(f"{args.job_id}: {jobs.wait(client, args.job_id, timeout_s=120)}")
    return 0


def _time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"
