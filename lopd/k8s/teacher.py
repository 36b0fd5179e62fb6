"""Container entrypoint of the online-OPD teacher server: resolve the teacher (hub id, directory
or published store artifact, fetched into the cache), then exec vLLM's OpenAI-compatible server.

    python -m lopd.k8s.teacher --model s3://bucket/models/qwen3-32b --port 8000 --tensor-parallel-size 8

The model is served under the name ``teacher`` (``opd.online.teacher_url`` points at
``http://<release>-teacher:<port>/v1``). Extra arguments are passed to vLLM unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys


def vllm_command(model_path: str, port: int, tp: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
            "--served-model-name", "teacher", "--host", "0.0.0.0", "--port", str(port),
            "--tensor-parallel-size", str(tp), *extra]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lopd.k8s.teacher", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="teacher: hub id, directory or store URI")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    args, extra = ap.parse_known_args(argv)
    from lopd import LopdError
    from lopd.models import resolve_model

    try:
        path = str(resolve_model(args.model, "models.teacher.uri").path)
    except LopdError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    cmd = vllm_command(path, args.port, args.tensor_parallel_size, extra)
    print(" ".join(cmd), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
