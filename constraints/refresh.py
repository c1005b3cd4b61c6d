"""Write a pip constraints file of the versions a fresh resolve picks today (`make constraints` runs this).

    python constraints/refresh.py OUT.txt REQUIREMENT...   e.g.  constraints/ci.txt torch==2.13.0 -e ".[test,bench]"

pip resolves the requirements from scratch (--dry-run --ignore-installed: nothing is installed or changed) and the
chosen versions, plus pip / setuptools / wheel, are written one `name==version` per line. The project itself is
left out (a constraints file cannot hold an editable requirement). Refreshing does not prove anything: run the
tests on the new pins (`make test`, and `make test-tf4` for constraints/transformers4.txt) before committing them.
"""
import json
import os
import subprocess
import sys
import tempfile


def resolve(requirements: list[str]) -> dict[str, str]:
    """{name: version} that `pip install REQUIREMENTS` would install into an empty environment."""
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "--no-build-isolation", "--report", report.name, "pip", "setuptools", "wheel",
                        *requirements], check=True)
        items = json.load(open(report.name))["install"]
    # Local labels dropped: torch==2.13.0 admits this machine's 2.13.0+cpu wheel and a CUDA machine's 2.13.0 alike.
    return {i["metadata"]["name"].lower(): i["metadata"]["version"].split("+")[0] for i in items
            if i["metadata"]["name"].lower() != "fastdistil"}


def main() -> None:
    out, requirements = sys.argv[1], sys.argv[2:]
    pins = resolve(requirements)
    header = (f"# Tested versions for CI, pip -c {out}. Regenerate with `make constraints` (a fresh resolve of:\n"
              f"#   {' '.join(requirements)}), then run the tests before committing.\n")
    text = header + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins))
    if os.path.exists(out) and open(out).read() == text:  # untouched: make would rebuild the venvs on a new mtime
        print(f"{out}: unchanged ({len(pins)} pins)")
        return
    with open(out, "w") as f:
        f.write(text)
    print(f"wrote {len(pins)} pins to {out}")


if __name__ == "__main__":
    main()
