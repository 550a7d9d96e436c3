"""Read TensorBoard event files written by tensorboardX (TFRecord framing, Event protos)."""

import struct
from pathlib import Path

from tensorboardX.proto import event_pb2


def read_events(logdir: Path) -> list:
    events = []
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            payload = data[pos + 12:pos + 12 + length]
            pos += 12 + length + 4
            ev = event_pb2.Event()
            ev.ParseFromString(payload)
            events.append(ev)
    return events


def tags(logdir: Path) -> dict[str, list[int]]:
    """tag -> steps at which it was written (scalars and images), as TensorBoard shows them:
    a writer's session start at step S (``purge_step``) discards what was written before
    at steps >= S."""
    out: dict[str, list[int]] = {}
    for ev in read_events(logdir):
        if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
            out = {tag: [s for s in steps if s < ev.step] for tag, steps in out.items()}
        for v in ev.summary.value:
            out.setdefault(v.tag, []).append(ev.step)
    return {tag: steps for tag, steps in out.items() if steps}
