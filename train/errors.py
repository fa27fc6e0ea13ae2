"""The errors of the training job that are the user's to fix.

``train/run.py`` ends each of them with one paragraph on stderr and exit status 2 instead of a
traceback (``--debug`` or ``LORAX_FN_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations


class ConfigError(ValueError):
  """A value of the config, or an input it names, that the run cannot use."""


class HubUnreachable(RuntimeError):
  """A dataset or model that is needed from the Hugging Face hub cannot be fetched."""
