"""The faust, mode and aiokafka internals the worker relies on (`streams/compat.py`, `streams/lane.py`,
`streams/worker.py`, `streams/lander.py`): this fails loudly, naming what moved, when an upgrade no longer has them.
The versions are pinned in pyproject.toml; a version bump starts here."""

from __future__ import annotations

import inspect
from importlib.metadata import version

import pytest

PINNED = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0", "mode-streaming": "0.7.1"}


@pytest.mark.parametrize(("dist", "pinned"), PINNED.items())
def test_the_pinned_versions_are_installed(dist: str, pinned: str) -> None:
    assert version(dist) == pinned, f"{dist} {version(dist)} is installed; the worker is checked against {pinned}"


def _params(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)  # type: ignore[arg-type]


def test_faust_consumer_has_what_the_lane_and_the_seek_patches_use() -> None:
    from faust.transport.consumer import Consumer

    methods = {
        "perform_seek": ["self"], "seek": ["self", "partition", "offset"], "_seek": ["self", "partition", "offset"],
        "getmany": ["self", "timeout"], "_drain_messages": ["self", "fetcher"], "_new_offset": ["self", "tp"],
        "_add_gap": ["self", "tp", "offset_from", "offset_to"], "seek_to_committed": ["self"],
        "ack": ["self", "message"], "commit": None, "wait_first": None, "assignment": None, "highwater": None,
    }  # fmt: skip
    for name, params in methods.items():
        fn = getattr(Consumer, name, None)
        fn = inspect.unwrap(fn) if fn is not None else None  # faust's own, also once this process patched it
        assert fn is not None, f"faust Consumer.{name} is gone"
        if params is not None:
            assert _params(fn)[: len(params)] == params, f"faust Consumer.{name}{inspect.signature(fn)} changed"
    source = inspect.getsource(Consumer)
    for attr in ("_read_offset", "_committed_offset", "_acked", "_unacked_messages", "_n_acked", "_commit_every",
                 "suspend_flow", "_on_message_in"):  # fmt: skip
        assert f"self.{attr} = " in source or f"    {attr}: " in source, f"faust Consumer no longer sets {attr}"
    assert "read_offset.update" in inspect.getsource(inspect.unwrap(Consumer.perform_seek)), (
        "faust's perform_seek changed"
    )


def test_faust_aiokafka_driver_has_what_the_compat_patches_use() -> None:
    from faust.transport.drivers import aiokafka as driver

    thread = driver.AIOKafkaConsumerThread
    for name in ("highwaters", "_highwaters", "call_thread", "_create_worker_consumer", "seek_to_beginning",
                 "earliest_offsets"):  # fmt: skip
        assert hasattr(thread, name), f"faust AIOKafkaConsumerThread.{name} is gone"
    assert hasattr(driver, "ensure_aiokafka_TP")
    from aiokafka import AIOKafkaConsumer

    assert "_fetch_max_wait_ms" in inspect.getsource(AIOKafkaConsumer.__init__), "aiokafka renamed fetch_max_wait_ms"


def test_mode_worker_signal_hooks_and_faust_app_seams_exist() -> None:
    import faust
    from aiokafka.abc import ConsumerRebalanceListener

    assert issubclass(faust.Worker, __import__("mode").Worker)
    for name in ("_on_sigterm", "_on_sigint"):
        assert callable(getattr(faust.Worker, name, None)), f"mode Worker.{name} is gone (bounded stop)"
    for name in ("consumer_generation_id", "flow_control", "crash", "topics"):
        assert hasattr(faust.App, name), f"faust App.{name} is gone"
    assert set(_params(ConsumerRebalanceListener.on_partitions_assigned)) == {"self", "assigned"}
