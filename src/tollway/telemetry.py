"""Structured logs, fed only through privacy.loggable(): anything not allow-listed is dropped."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

from tollway.privacy import loggable


def _allow_listed(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> Mapping[str, Any]:
    return loggable(event_dict)


def configure_logging(level: int = logging.INFO) -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _allow_listed,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )


log = structlog.get_logger("tollway")


def log_startup(host: str, port: int, workers: int, notices: list[str]) -> None:
    for notice in notices:
        log.warning("startup_notice", notice=notice)
    log.info("serving", host=host, port=port, count=workers)


def record_request(**fields: Any) -> None:
    """One line per /v1 request: the metadata allow-listed in privacy.py, nothing else."""
    log.info("request", **fields)
