"""argparse pieces every stage's sub-commands share (below the stages, so none imports the CLI)."""
from __future__ import annotations

import argparse


class IntermixedParser(argparse.ArgumentParser):
    """Lets options sit between CONFIG and the overrides (`train cfg k=v --no-progress k2=v2`):
    plain argparse fills a `nargs="*"` positional only up to the first option and rejects the rest."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:  # parse_known_intermixed_args calls back in here
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def add_config_parser(sub, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    """A sub-command taking CONFIG and dotted KEY=VALUE overrides, options anywhere among them."""
    sp = sub.add_parser(name, help=help, **kwargs)
    sp.__class__ = IntermixedParser  # add_parser has no per-parser class argument
    sp.add_argument("config", help="YAML config (see configs/)")
    sp.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides, e.g. train.lr=1e-4")
    return sp

