"""
Fuzzing the frame decoder and a whole server connection with hostile bytes:
quick hypothesis runs in the default suite, and bounded atheris
(coverage-guided) runs over the kept corpus in the slow suite that CI runs.
"""

import os
import subprocess
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.support.fuzz import seeds, targets
from tests.support.marks import slow
from tests.support.processes import REPO_ROOT

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def mutated_sessions() -> st.SearchStrategy[bytes]:
    """Real client sessions with bytes flipped, cut, repeated or inserted."""
    base = st.sampled_from(list(seeds.sessions().values()))

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(base))
        for _ in range(draw(st.integers(0, 4))):
            op = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
            at = draw(st.integers(0, max(len(data) - 1, 0)))
            if op == "flip" and data:
                data[at] ^= draw(st.integers(1, 255))
            elif op == "cut":
                del data[at : at + draw(st.integers(1, 64))]
            elif op == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=32))
            else:
                data[at:at] = data[at : at + draw(st.integers(1, 200))]
        return bytes(data)

    return mutate()


class HypothesisFuzzTests(SynchronousTestCase):
    @FUZZ
    @given(st.binary(max_size=4096))
    def test_decoder_random_bytes(self, data: bytes) -> None:
        """Random bytes only ever decode to frames or protocol errors."""
        targets.decode_all(data)

    @FUZZ
    @given(st.binary(max_size=2048))
    def test_server_random_bytes(self, data: bytes) -> None:
        """A server fed random bytes answers with whole frames and never crashes."""
        targets.server_session(data)

    @FUZZ
    @given(mutated_sessions())
    def test_server_mutated_sessions(self, data: bytes) -> None:
        """Damaged real sessions never crash the server nor store wrong bytes."""
        targets.server_session(data)

    def test_corpus_replays(self) -> None:
        """Every kept corpus input still passes both targets."""
        corpus = os.path.join(os.path.dirname(targets.__file__), "corpus")
        count = 0
        for target in ("server", "decoder"):
            directory = os.path.join(corpus, target)
            for name in sorted(os.listdir(directory)):
                with open(os.path.join(directory, name), "rb") as f:
                    data = f.read()
                targets.decode_all(data)
                targets.server_session(data)
                count += 1
        self.assertGreaterEqual(count, 14)


class AtherisFuzzTests(SynchronousTestCase):
    def run_fuzzer(self, target: str, seconds: int) -> None:
        try:
            import atheris  # noqa: F401
        except ImportError:
            if os.environ.get("CI"):
                self.fail("atheris is not installed; `make test` installs it")
            raise SkipTest("atheris is not installed (pip install atheris)")
        proc = subprocess.run(
            [sys.executable, "-m", "tests.support.fuzz.run", target, "--seconds", str(seconds)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=seconds + 120,
            env=dict(os.environ, PYTHONPATH=REPO_ROOT),
        )
        tail = "\n".join(proc.stderr.splitlines()[-30:])
        self.assertEqual(proc.returncode, 0, f"the fuzzer found a crash:\n{tail}")
        self.assertIn("Done", proc.stderr)

    @slow
    def test_atheris_server(self) -> None:
        """Coverage-guided fuzzing of a server connection, 60 s, over the corpus."""
        self.run_fuzzer("server", 60)

    @slow
    def test_atheris_decoder(self) -> None:
        """Coverage-guided fuzzing of the frame decoder, 30 s, over the corpus."""
        self.run_fuzzer("decoder", 30)
