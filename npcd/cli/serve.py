"""`npcd serve`: run the daemon until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio

from npcd.service import config as daemon_config
from npcd.service import logs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    daemon_config.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = daemon_config.load(args)
    logs.configure(json=config.log_json, level=config.log_level)
    from npcd.service.daemon import serve

    return asyncio.run(serve(config))
