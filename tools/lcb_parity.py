"""Produce tests/fixtures/parity/code_parity.json: LiveCodeBench's own verdicts on the code parity cases.

Runs every case of ``tools/parity_code_cases.py`` through ``livecodebench/evaluation/testing_util.py``
of the ``nvidia-livecodebench`` wheel (LiveCodeBench's reference implementation), exactly as its
``check_correctness`` does: ``run_test`` in a forked process, with LiveCodeBench's global timeout
``(timeout + 1) * tests + 5`` s and ``sys.set_int_max_str_digits(50000)``. Only that one module
is imported (it needs numpy and the standard library), so none of the package's other
dependencies are installed. Rerun it when the cases change (see docs/eval.md):

    pip download nvidia-livecodebench==26.3 --no-deps -d /some/dir
    .venv/bin/python tools/lcb_parity.py --wheel /some/dir/nvidia_livecodebench-26.3-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import multiprocessing as mp
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.set_int_max_str_digits(50000)  # what LiveCodeBench's compute_code_generation_metrics sets
from parity_code_cases import CASES  # noqa: E402

MODULE = "livecodebench/evaluation/testing_util.py"
OUT = ROOT / "tests" / "fixtures" / "parity" / "code_parity.json"


def load_testing_util(wheel: Path):
    tmp = Path(tempfile.mkdtemp(prefix="lcb-testing-util-"))
    with zipfile.ZipFile(wheel) as z:
        (tmp / "testing_util.py").write_bytes(z.read(MODULE))
        version = next((n.split("/")[0] for n in z.namelist() if n.endswith(".dist-info/METADATA")), wheel.name)
    spec = importlib.util.spec_from_file_location("lcb_testing_util", tmp / "testing_util.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, version.removesuffix(".dist-info")


def _child(tu, sample, code, timeout, conn) -> None:
    res, meta = tu.run_test(sample, test=code, debug=False, timeout=timeout)
    conn.send(([r.item(0) if hasattr(r, "item") else r for r in res], meta.get("error_code")))


def lcb_verdict(tu, code: str, tests: list[tuple[str, str]], fn_name: str | None, timeout: int) -> dict:
    """LiveCodeBench's result list and pass/fail for one case (check_correctness's process and timeout)."""
    sample = {"input_output": json.dumps({"inputs": [i for i, _ in tests], "outputs": [o for _, o in tests],
                                          "fn_name": fn_name})}
    recv, send = mp.Pipe(duplex=False)
    p = mp.get_context("fork").Process(target=_child, args=(tu, sample, code, timeout, send))
    p.start()
    results = None
    if recv.poll((timeout + 1) * len(tests) + 5):
        results, _ = recv.recv()
    p.join(1)
    if p.is_alive():
        p.kill()
        p.join()
    if results is None:  # LiveCodeBench's "global timeout": every test failed
        results = [-1] * len(tests)
    results = [bool(r) if isinstance(r, bool) or type(r).__name__ == "bool_" else int(r) for r in results]
    passed = bool(results) and all(r is True or (not isinstance(r, bool) and r > 0) for r in results)
    first = next((r for r in results if r is not True), None)
    return {"results": results, "passed": passed, "first_failure": None if passed else first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", type=Path, required=True, help="nvidia_livecodebench-*.whl")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    tu, version = load_testing_util(args.wheel)
    rows = []
    for cid, code, tests, fn_name, timeout in CASES:
        v = lcb_verdict(tu, code, tests, fn_name, timeout)
        rows.append({"id": cid, "mode": "functional" if fn_name else "stdin", "func_name": fn_name,
                     "code": code, "tests": [{"input": i, "output": o} for i, o in tests], "timeout_s": timeout,
                     "lcb": v})
        print(f"{cid:40s} {'PASS' if v['passed'] else 'fail'} {v['results']}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    prelude = hashlib.sha256(tu.import_string.encode()).hexdigest()
    args.out.write_text(json.dumps({"reference": f"{version} {MODULE} run_test", "import_string_sha256": prelude,
                                    "cases": rows}, indent=1) + "\n")
    print(f"wrote {len(rows)} cases to {args.out.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
