"""
Do the CPU tests of the kernels bite? Plant a bug in the real kernels (kernels/*.cu), one at a time in a
scratch copy of the repository, run the README's test command there (python -m pytest -q tests, with -rf
for the list of failures and no PARSCALE_* variable set) and record which tests, and which sanitizer,
caught it. A control run with nothing planted must pass. Writes the log (default results/kernel_mutants.txt)
and exits 1 if any planted bug went uncaught.

    python scripts/kernel_mutants.py                  # the control and every mutant, the whole suite each time
    python scripts/kernel_mutants.py --only=3 --tests=tests/test_kernels_cpu.py   # one mutant, one file: a quick look
"""
import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (what the bug is, file, text in it, what replaces that text): each text occurs exactly once
MUTANTS = [
    ("no barrier after the query is staged in shared memory", "kernels/attention.cu",
     "q_s[d] = to_f32(q[d]) * scale;\n    __syncthreads();\n", "q_s[d] = to_f32(q[d]) * scale;\n"),
    ("no barrier after the LayerNorm prologue", "kernels/gemv.cu",
     "xs + r * K, K, lane);\n        __syncthreads();\n", "xs + r * K, K, lane);\n"),
    ("the split ticket counted to nsplit - 1", "kernels/attention.cu",
     "== (unsigned int)(n_active - 1));", "== (unsigned int)(nsplit - 1));"),
    ("an unused read past a weight row's end", "kernels/gemv.cu",
     "    const float bn = bias ? to_f32(bias[n]) : 0.f;\n",
     "    const float bn = bias ? to_f32(bias[n]) : 0.f;\n"
     "    { volatile float past = to_f32(wrow[K]); (void)past; }\n"),
    ("a wrong bounds guard: n > N instead of n >= N", "kernels/gemv.cu",
     "if (n >= N) return;", "if (n > N) return;"),
    ("two parameters of the same type swapped in a kernel's signature", "kernels/gemv.cu",
     "float* __restrict__ x, int R, int N, int K) {", "float* __restrict__ x, int N, int R, int K) {"),
]
HEADLINE = re.compile(r"(AddressSanitizer: [\w-]+|ThreadSanitizer: [\w -]+?(?= \(|$)|runtime error: [^\n]{0,60})", re.M)


def scratch_copy(dest):
    """The repository's files as they are in the working tree (tracked, and new ones git does not ignore)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        if os.path.exists(os.path.join(ROOT, rel)):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), os.path.join(dest, rel))


def plant(dest, mutant):
    _, path, old, new = mutant
    text = open(os.path.join(dest, path)).read()
    if text.count(old) != 1:
        raise SystemExit(f"error: the text to replace occurs {text.count(old)} times in {path}, not once: {old!r}")
    with open(os.path.join(dest, path), "w") as fh:
        fh.write(text.replace(old, new))


def run_tests(dest, tests):
    """The README's test command in dest -> (summary line, {failed test: why}, seconds)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARSCALE_")}
    env["COLUMNS"] = "400"  # pytest cuts each failure's reason to the terminal's width
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", *tests, "-vv", "-rf", "-p", "no:cacheprovider"], cwd=dest,
                       env=env, capture_output=True, text=True)
    out = r.stdout + r.stderr
    summary = next((ln.strip("= ") for ln in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed)", ln)), "")
    failed = {test: "" for test in re.findall(r"^(tests/\S+) FAILED", out, re.M)}  # -vv: each test as it ends
    if not summary and r.returncode < 0:  # the test process died, in the test whose line has no outcome
        died = re.search(r"^(tests/\S+) (?!PASSED|FAILED|SKIPPED)(.*)\n(?:.*\n)*?Fatal Python error: (.*)$", out, re.M)
        if died:
            failed[died.group(1)] = f"the test process died here: {died.group(2).strip()} ({died.group(3).strip()})"
        return (f"pytest died (signal {-r.returncode}) after {out.count(' PASSED')} passed, {len(failed)} failed",
                failed, time.time() - t0)
    if not summary:
        raise SystemExit(f"error: pytest exited {r.returncode} without running the tests:\n{out[-3000:]}")
    for m in re.finditer(r"^FAILED (\S+)(?: - (.*))?$", out, re.M):
        test = m.group(1)
        section = out.split(f"_ {test.split('::')[-1]} _", 1)[-1].split("\n____", 1)[0] if "sanitizer" in test else ""
        found = HEADLINE.search(section) or HEADLINE.search(m.group(2) or "")
        failed[test] = found.group(1) if found else (m.group(2) or "")[:90]
    return summary, failed, time.time() - t0


def describe(failed):
    """Failed tests grouped by test function: 'file::test x3 (why)'."""
    groups = {}
    for test, why in failed.items():
        groups.setdefault(test.split("[")[0], []).append(why)
    lines = []
    for name, whys in groups.items():
        sanitizer = sorted({w for w in whys if "Sanitizer" in w or "runtime error" in w})
        why = "; ".join(sanitizer) or next((w for w in whys if "died" in w), "") or next(filter(None, whys), "")
        lines.append(f"    {name}" + (f" x{len(whys)}" if len(whys) > 1 else "") + (f": {why[:110]}" if why else ""))
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "kernel_mutants.txt"), help="the log to write")
    ap.add_argument("--tests", nargs="*", default=["tests"], help="what pytest runs (default: the README's: tests)")
    ap.add_argument("--only", type=int, default=None,
                    help=f"one mutant by its number (1..{len(MUTANTS)}); 0 = the control")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    gxx = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    lines = [f"# python scripts/kernel_mutants.py: each bug planted alone in a scratch copy of {commit.strip()}"
             f"{' (with uncommitted changes)' if dirty else ''}, then `python -m pytest -q {' '.join(args.tests)}` "
             f"(+ -vv -rf, for the report) there", f"# {time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores, Python "
             f"{platform.python_version()}, {gxx[0] if gxx else 'no g++'}", ""]
    chosen = range(len(MUTANTS) + 1) if args.only is None else [args.only]
    uncaught = []
    for i in chosen:
        with tempfile.TemporaryDirectory() as dest:
            scratch_copy(dest)
            if i:
                plant(dest, MUTANTS[i - 1])
            what = f"mutant {i}: {MUTANTS[i - 1][0]} ({MUTANTS[i - 1][1]})" if i else "control: nothing planted"
            print(f"[mutants] {what} ...", flush=True)
            summary, failed, seconds = run_tests(dest, args.tests)
        verdict = ("caught" if failed else "NOT CAUGHT") if i else ("passes" if not failed and "passed" in summary
                                                                   else "FAILS")
        if (i and not failed) or (not i and verdict == "FAILS"):
            uncaught.append(what)
        lines += [f"{what}", f"  {verdict}: {summary} ({seconds:.0f} s)"] + describe(failed) + [""]
        print("\n".join(lines[-(len(failed) and len(describe(failed))) - 3:]), flush=True)
    lines.append(f"every planted bug caught: {'yes' if not uncaught else 'NO: ' + '; '.join(uncaught)}")
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"[mutants] wrote {args.out}")
    sys.exit(1 if uncaught else 0)


if __name__ == "__main__":
    main()
