"""Reading back what a run logged to TensorBoard, without the tensorboard package."""

import struct

from tensorboardX.proto import event_pb2


def tb_images(logdir) -> list[tuple[int, str, int, int]]:
    """(step, tag, height, width) of every image summary in a TensorBoard log (TFRecord events)."""
    got = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + n])
            at += 12 + n + 4  # length, its crc, the record, its crc
            for v in event.summary.value:
                if v.HasField("image"):
                    got.append((event.step, v.tag, v.image.height, v.image.width))
    return got
