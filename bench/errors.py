"""One exception type for every user-facing problem.

The CLI turns a :class:`BenchError` into a single line on stderr and a non-zero exit, so each message
must name the problem *and* the fix.
"""


class BenchError(Exception):
    """A problem with the user's input (data, model, checkpoint, knob, config, store)."""
