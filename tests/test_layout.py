"""Project layout rules: the stdlib `platform` is never shadowed, imports are cheap, configs load."""

import dataclasses
import glob
import importlib
import inspect
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("vllm", "trl", "peft", "ray.serve")


def test_no_platform_init_and_stdlib_platform_imports_from_repo_root():
    assert not os.path.exists(os.path.join(REPO, "platform", "__init__.py"))
    out = subprocess.run([sys.executable, "-c", "import platform; print(platform.__file__, platform.python_version())"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    path = out.split()[0]
    assert not path.startswith(os.path.join(REPO, "platform")), f"stdlib platform shadowed by {path}"


def test_every_library_module_imports_without_heavy_dependencies():
    code = (
        "import pkgutil, sys, recalign\n"
        "names = [m.name for m in pkgutil.walk_packages(recalign.__path__, 'recalign.')]\n"
        "for name in names: __import__(name)\n"
        f"heavy = [h for h in {HEAVY!r} if h in sys.modules]\n"
        "print(len(names), heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.path.join(REPO, "platform")})
    assert out.returncode == 0, out.stderr
    count, heavy = out.stdout.strip().split(" ", 1)
    assert int(count) >= 10
    assert heavy == "[]", f"importing the library pulled in {heavy}"


def _job_config_class(module_name: str):
    module = importlib.import_module(module_name)
    classes = [obj for name, obj in inspect.getmembers(module, inspect.isclass)
               if dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__ and name.endswith("Job")]
    assert len(classes) == 1, f"jobs/{module_name}.py must define exactly one *Job config dataclass"
    return classes[0]


def _shipped_yamls():
    for path in sorted(glob.glob(os.path.join(REPO, "jobs", "configs", "**", "*.yaml"), recursive=True)):
        rel = os.path.relpath(path, os.path.join(REPO, "jobs", "configs"))
        job = rel.split(os.sep)[0] if os.sep in rel else os.path.splitext(rel)[0]
        yield pytest.param(path, job, id=rel)


@pytest.mark.parametrize("path, job", list(_shipped_yamls()))
def test_every_shipped_yaml_loads_into_its_job_config(path, job):
    from recalign.config import load_config

    assert os.path.exists(os.path.join(REPO, "jobs", f"{job}.py")), f"{path}: no job named {job}"
    cfg = load_config(_job_config_class(job), path)
    assert dataclasses.is_dataclass(cfg)


def test_every_job_has_a_config_class():
    jobs = [os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(REPO, "jobs", "*.py"))]
    for job in jobs:
        if job != "launch":
            _job_config_class(job)
