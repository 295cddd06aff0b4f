# -*- test-case-name: tests.system.test_packaging -*-
"""
The wheel, built as a user would (C{pip wheel --no-deps}, the backend from
C{pyproject.toml}) from a copy of the checkout's packaging files: its
metadata fields, the twistd drop-ins without an C{__init__.py} beside
them, and the example tac files and systemd units under
C{share/imgresume/}.
"""

from __future__ import annotations

import email.parser
import glob
import os
import shutil
import subprocess
import sys
import zipfile

from twisted.trial.unittest import SynchronousTestCase

from tests.support.processes import REPO_ROOT, child_env

#: What the wheel is built from: the packaging files and what they name.
SOURCES = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "imgresume",
           "twisted", "tac", "docs/examples")


class WheelTests(SynchronousTestCase):
    """One wheel, built once for the class."""

    wheel: str

    @classmethod
    def setUpClass(cls) -> None:
        cls.work = os.path.abspath("packaging-wheel")
        shutil.rmtree(cls.work, ignore_errors=True)
        tree = os.path.join(cls.work, "src")
        for name in SOURCES:
            source, target = os.path.join(REPO_ROOT, name), os.path.join(tree, name)
            if os.path.isdir(source):
                shutil.copytree(source, target, ignore=shutil.ignore_patterns(
                    "__pycache__", "*.pyc", "dropin.cache"))
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copy(source, target)
        out = os.path.join(cls.work, "dist")
        done = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", out, tree],
            env=child_env(), capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise AssertionError(f"pip wheel failed:\n{done.stdout}\n{done.stderr}")
        [cls.wheel] = glob.glob(os.path.join(out, "imgresume-*.whl"))

    def names(self) -> list[str]:
        """The files in the wheel."""
        with zipfile.ZipFile(self.wheel) as z:
            return z.namelist()

    def metadata(self) -> email.message.Message:
        """The wheel's METADATA."""
        with zipfile.ZipFile(self.wheel) as z:
            [name] = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
            return email.parser.Parser().parsestr(z.read(name).decode("utf-8"))

    def test_metadata(self) -> None:
        """Name, version, summary, author, Python, classifiers, the README, dependencies."""
        meta = self.metadata()
        self.assertEqual(meta["Name"], "imgresume")
        self.assertEqual(meta["Version"], "0.1.0")
        self.assertIn("Resumable upload", meta["Summary"])
        self.assertEqual(meta["Author"], "The imgresume maintainers")
        self.assertEqual(meta["Requires-Python"], ">=3.11")
        classifiers = meta.get_all("Classifier")
        self.assertIn("Framework :: Twisted", classifiers)
        self.assertIn("Programming Language :: Python :: 3.11", classifiers)
        self.assertEqual(meta["Description-Content-Type"], "text/markdown")
        self.assertIn("imgresume", meta.get_payload())
        requires = meta.get_all("Requires-Dist")
        self.assertTrue(any(r.startswith("Twisted") for r in requires), requires)
        self.assertIn("s3", meta.get_all("Provides-Extra"))

    def test_plugins(self) -> None:
        """The drop-ins are in twisted/plugins/, with no __init__.py and no cache."""
        names = self.names()
        self.assertIn("twisted/plugins/imgresume_dropin.py", names)
        self.assertIn("twisted/plugins/imgresume_tls_endpoint.py", names)
        for forbidden in ("twisted/__init__.py", "twisted/plugins/__init__.py",
                          "twisted/plugins/dropin.cache"):
            self.assertNotIn(forbidden, names)
        self.assertNotIn("tests/__init__.py", names)

    def test_examples(self) -> None:
        """The tac files and systemd units are installed under share/imgresume/."""
        names = self.names()
        data = [n.split(".data/data/", 1)[1] for n in names if ".data/data/" in n]
        for tac in ("server.tac", "balancer.tac", "cluster.tac"):
            self.assertIn(f"share/imgresume/tac/{tac}", data)
        for example in ("imgresume@.service", "imgresume-lb.service", "haproxy.cfg"):
            self.assertIn(f"share/imgresume/examples/{example}", data)

    def test_console_script(self) -> None:
        """The imgresume command is declared."""
        with zipfile.ZipFile(self.wheel) as z:
            [name] = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
            self.assertIn("imgresume = imgresume.cli:main", z.read(name).decode())
