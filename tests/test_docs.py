"""The README and docs/ as a user reads them: every command they show parses with keys that exist, the
configuration reference is current, links resolve, and the bring-your-own-data walkthrough runs."""

from __future__ import annotations

import glob
import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.helpers import REPO

DOCS = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
JOB_FILE = re.compile(r"^(?:jobs/(\w+)\.py|serve/app\.py)$")


def code_lines(path: str) -> list[str]:
    """Shell lines inside the file's fenced code blocks (bash or unlabelled), comments dropped."""
    lines, fence = [], None
    for line in open(path).read().splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else (line[3:].strip() or "bash")
            continue
        if fence == "bash" and line.strip():
            text = re.split(r"\s+#\s", line.strip())[0].strip()
            if lines and lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1].rstrip() + " " + text  # a command continued on the next line
            else:
                lines.append(text)
    return lines


def job_commands(path: str) -> list[tuple[str, list[str]]]:
    """(module, argv, line) of every job command: python jobs/X.py, sh jobs/run X, python serve/app.py,
    serve run serve.app:app_builder (also after `ray job submit ... --`, and each side of `&&`). Optional parts written as
    `[key=value ...]` and `<placeholders>` are left out."""
    found = []
    for line in (part.strip() for whole in code_lines(path) for part in whole.split(" && ")):
        if not line.startswith(("python", "sh ", "serve ", "ray job submit")):
            continue
        tokens = shlex.split(line)
        if "--" in tokens and tokens[:3] == ["ray", "job", "submit"]:
            tokens = tokens[tokens.index("--") + 1:]
        if len(tokens) >= 2 and tokens[0] in ("python", "python3") and JOB_FILE.match(tokens[1]):
            match = JOB_FILE.match(tokens[1])
            module, argv = (match.group(1) or "serve.app"), tokens[2:]
        elif len(tokens) >= 3 and tokens[:2] == ["sh", "jobs/run"]:
            module, argv = tokens[2].removesuffix(".py"), tokens[3:]
        elif len(tokens) >= 3 and tokens[:2] == ["serve", "run"] and tokens[2] == "serve.app:app_builder":
            module, argv = "serve.app", tokens[3:]
        else:
            continue
        kept, optional = [], False
        for tok in argv:
            optional = optional or tok.startswith("[")
            if optional:
                optional = not tok.endswith("]")
            elif "<" not in tok and tok != "...":
                kept.append(tok)
        found.append((module, kept, line))
    return found


ALL_COMMANDS = [(os.path.relpath(path, REPO), module, argv, line) for path in DOCS
                for module, argv, line in job_commands(path)]


def test_the_docs_show_commands_for_the_main_jobs():
    modules = {module for _, module, _, _ in ALL_COMMANDS}
    assert {"pipeline", "prepare", "evaluate", "sweep", "spread", "serve.app"} <= modules, modules


@pytest.mark.parametrize("where,module,argv,line", ALL_COMMANDS, ids=[f"{c[0]}:{c[3][:60]}" for c in ALL_COMMANDS])
def test_every_command_in_the_docs_parses(where, module, argv, line, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    job = importlib.import_module(module)
    with pytest.raises(SystemExit) as exited:
        job.main(argv + ["print_config=true"])
    err = capsys.readouterr().err
    assert exited.value.code == 0, f"{where}: `{line}` does not parse: {err}"


def test_the_configuration_reference_is_current():
    done = subprocess.run([sys.executable, "docs/generate.py", "--check"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.path.join(REPO, "platform")}, timeout=300)
    assert done.returncode == 0, done.stderr


def test_links_between_the_docs_resolve():
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", open(path).read()):
            if "://" in target:
                continue
            assert os.path.exists(os.path.join(os.path.dirname(path), target)), f"{path}: broken link {target}"


def test_the_readme_is_a_five_minute_read():
    text = open(os.path.join(REPO, "README.md")).read()
    assert len(text.splitlines()) <= 150, "README: keep the detail in docs/"
    for needed in ("make run", "make test", "docs/your-data.md", "docs/configuration.md", "docs/cluster.md",
                   "docs/serving.md", "docs/results.md", "docs/pipeline.md", "docs/benchmarks.md"):
        assert needed in text, needed


def write_walkthrough_tables(folder) -> None:
    """A small clustered log in the documented format: 40 users, 60 items in 3 genres, 14 interactions each."""
    import numpy as np

    rng = np.random.default_rng(0)
    genres = ["Comedy", "Drama", "Horror"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "items.csv"), "w") as out:
        out.write("item_id,title,year,genres\n")
        for i in range(60):
            out.write(f"i{i},Film number {i},{1980 + i % 30},{genres[i % 3]}|{genres[(i + 1) % 3]}\n")
    with open(os.path.join(folder, "interactions.csv"), "w") as out:
        out.write("user_id,item_id,timestamp,rating\n")
        for u in range(40):
            liked = [i for i in range(60) if i % 3 == u % 3]
            for t, item in enumerate(rng.choice(liked, size=14, replace=False)):
                out.write(f"u{u},i{item},{1_700_000_000 + 100 * t},{int(rng.integers(3, 6))}\n")


@pytest.mark.slow
@pytest.mark.ray
def test_the_your_data_walkthrough_runs_as_written(ray_local, tmp_path, monkeypatch):
    """docs/your-data.md's commands, in order, on a generated table at my-data/ (run.root and models_dir
    point into the test's temp dir)."""
    from recalign.data.dataset import Dataset

    monkeypatch.chdir(tmp_path)
    write_walkthrough_tables(tmp_path / "my-data")
    commands = job_commands(os.path.join(REPO, "docs", "your-data.md"))
    assert [module for module, _, _ in commands] == ["prepare", "pipeline"]
    extra = [f"run.root={tmp_path / 'runs'}"]
    for module, argv, _ in commands:
        job = importlib.import_module(module)
        job.main(argv + extra + ([f"models_dir={tmp_path / 'models'}"] if module == "pipeline" else []))
    run = tmp_path / "runs" / "mine"
    data = Dataset(str(run / "data"))
    assert data.meta["num_users"] == 40 and (run / "eval" / "metrics.md").is_file()
    assert "llm zero-shot" in (run / "eval" / "metrics.md").read_text()
