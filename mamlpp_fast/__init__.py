"""mamlpp-fast: a fast, exact MAML++ trainer.

`mamlpp_fast.reference.MAMLFewShotClassifier` is the pure-PyTorch oracle that processes tasks one at a
time like the authors' code; `mamlpp_fast.MAMLFewShotClassifier` is the fast learner (all tasks of a
meta-batch at once) with the same API.
"""
__version__ = "0.1.0"

from .config import load_args, ConfigError  # noqa: E402,F401


def __getattr__(name):
    # Lazy import so that `import mamlpp_fast` stays cheap and the learners load only when used.
    if name == "MAMLFewShotClassifier":
        from .fast import MAMLFewShotClassifier
        return MAMLFewShotClassifier
    raise AttributeError(name)
