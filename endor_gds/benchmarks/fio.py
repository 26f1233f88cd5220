"""fio, the reference for storage bandwidth: its version, and its sequential O_DIRECT read of a file."""

from __future__ import annotations

import json
import subprocess

from endor_gds.errors import EndorError
from endor_gds.read.buffers import ALIGN

__all__ = ["FioError", "FIO_ENGINES", "FIO_SHAPE", "fio_version", "run_fio"]


class FioError(EndorError):
    """fio could not measure as asked; the message has its error and the command line."""


def fio_version(fio: str | None) -> str:
    if not fio:
        return ""
    try:
        return subprocess.run([fio, "--version"], capture_output=True, text=True, timeout=30,
                              check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _fio_filename(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:")  # fio splits --filename on ':'


FIO_ENGINES = ("libaio", "psync")


FIO_SHAPE = {"libaio": "one stream, iodepth = threads", "io_uring": "one stream, iodepth = threads",
              "psync": "numjobs = threads, one slice each"}


def run_fio(fio: str, path: str, nbytes: int, chunk: int, threads: int,
            engine: str = "libaio") -> float:
    """fio's sequential O_DIRECT read bandwidth (GB/s) over the first ``nbytes`` of ``path``.

    ``libaio`` / ``io_uring``: one job, ``iodepth=threads``. ``psync``: ``threads`` jobs (threads,
    not processes, as ours), each reading ``nbytes / threads`` (whole blocks) from its own offset,
    bandwidth summed over the group.
    """
    cmd = [fio, "--name=endor-profile-io", f"--filename={_fio_filename(path)}", "--readonly",
           "--rw=read", f"--bs={chunk}", "--direct=1", f"--ioengine={engine}", "--invalidate=1",
           "--thread", "--output-format=json"]
    if engine == "psync":
        per_job = nbytes // threads // chunk * chunk or nbytes // threads // ALIGN * ALIGN
        if per_job == 0:
            raise FioError(f"fio psync: {nbytes} bytes cannot be split over {threads} jobs")
        expect = per_job * threads
        cmd += [f"--numjobs={threads}", f"--size={per_job}", f"--offset_increment={per_job}",
                "--group_reporting"]
    else:
        # whole blocks: fio stops before a last partial block (a packed file's size is a multiple
        # of 4 KiB, not of a 1 or 4 MiB block)
        expect = nbytes // chunk * chunk or nbytes // ALIGN * ALIGN
        cmd += [f"--iodepth={threads}", "--numjobs=1", f"--size={expect}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    text = proc.stdout[proc.stdout.find("{"):] if "{" in proc.stdout else ""
    if proc.returncode != 0 or not text:
        raise FioError(f"fio failed (exit {proc.returncode}): {proc.stderr.strip()[-400:]}; "
                           f"command: {' '.join(cmd)}")
    job = json.loads(text)["jobs"][0]
    read = job["read"]
    if job.get("error") or read["io_bytes"] != expect:
        raise FioError(f"fio read {read['io_bytes']} of {expect} bytes "
                           f"(error {job.get('error')}); command: {' '.join(cmd)}")
    return read["bw_bytes"] / 1e9
