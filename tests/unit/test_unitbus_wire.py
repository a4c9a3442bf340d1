"""lanectl.systemd encodes Properties.Get calls and decodes their answers itself (a one-shot `lanectl status`
would spend ~45 ms at 48 lanes doing it through jeepney): what it writes must be what jeepney writes, and what it
reads what jeepney reads. tests/systemd/test_unitbus.py checks the same against a real systemd."""
from __future__ import annotations

import pytest
from jeepney import DBusAddress, Properties, new_error, new_method_return, new_signal
from jeepney.low_level import Endianness, HeaderFields, Message, MessageType, Parser

from lanectl import systemd
from lanectl.systemd import _get_call, _messages, unit_object_path

UNITS = ["lanectl-lane@alpha.service", "lanectl-lane@a-b_c.9.service", "lanectl-supervisor.service", "x.service"]
PROPS = [("org.freedesktop.systemd1.Unit", "ActiveState"), ("org.freedesktop.systemd1.Service", "MainPID"),
         ("org.freedesktop.systemd1.Service", "ExecMainStartTimestampMonotonic"), ("org.freedesktop.systemd1.Unit", "Id")]


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize(("iface", "prop"), PROPS)
def test_a_get_call_is_the_one_jeepney_makes(unit: str, iface: str, prop: str) -> None:
    ours = _get_call(unit_object_path(unit), iface, prop)
    theirs = Properties(DBusAddress(unit_object_path(unit), "org.freedesktop.systemd1", iface)).get(prop)
    assert ours == theirs.serialise(serial=0)
    msg = Parser().feed(ours)[0]
    assert msg.header.fields[HeaderFields.path] == unit_object_path(unit)
    assert msg.body == (iface, prop)


def call() -> Message:
    return Properties(DBusAddress("/org/freedesktop/systemd1/unit/x_2eservice", "org.freedesktop.systemd1",
                                  "org.freedesktop.systemd1.Service")).get("MainPID")


VALUES = [("s", "active"), ("s", ""), ("s", "lane alpha: 2/4 busy, ünï"), ("u", 4242), ("u", 0),
          ("t", 2**64 - 1), ("t", 123456789012), ("ay", bytes.fromhex("0123456789abcdef0123456789abcdef")),
          ("ay", b""), ("b", True), ("b", False), ("i", -5), ("x", -(2**40)), ("o", "/org/freedesktop/systemd1")]


def test_answers_decode_as_jeepney_decodes_them() -> None:
    # each answer names the serial of its call (set by hand: the calls here were never sent)
    stream = b""
    for serial, (sig, value) in enumerate(VALUES, start=10):
        msg = new_method_return(call(), "v", ((sig, value),))
        msg.header.fields[HeaderFields.reply_serial] = serial
        stream += msg.serialise(serial=serial + 1000)
    err = new_error(call(), "org.freedesktop.DBus.Error.UnknownInterface", "s", ("no such interface",))
    err.header.fields[HeaderFields.reply_serial] = 99
    stream += err.serialise(serial=2000)
    sig_msg = new_signal(DBusAddress("/org/freedesktop/DBus", interface="org.freedesktop.DBus"), "NameAcquired", "s",
                         (":1.5",))
    stream += sig_msg.serialise(serial=2001)
    hello = new_method_return(call(), "s", (":1.5",))
    hello.header.fields[HeaderFields.reply_serial] = 100
    stream += hello.serialise(serial=2002)

    expected = [(s, v) for s, (_, v) in enumerate(VALUES, start=10)] + [(99, None), (None, None), (100, ":1.5")]
    got, used = _messages(bytearray(stream))
    assert used == len(stream)
    assert got == expected
    for (_, ours), msg in zip(got, Parser().feed(stream)):  # the same values jeepney reads
        if msg.header.message_type is MessageType.method_return:
            body = msg.body[0]
            assert ours == (body[1] if isinstance(body, tuple) else body)
    # fed a byte at a time, a message is taken only once it is whole
    buf, seen = bytearray(), []
    for i in range(len(stream)):
        buf += stream[i:i + 1]
        out, n = _messages(buf)
        del buf[:n]
        seen += out
    assert seen == expected and not buf


def test_a_shape_it_does_not_decode_goes_to_jeepney() -> None:
    msg = new_method_return(call(), "v", (("a{sv}", {"k": ("u", 1)}),))
    msg.header.fields[HeaderFields.reply_serial] = 7
    assert _messages(bytearray(msg.serialise(serial=8))) == ([(7, {"k": ("u", 1)})], len(msg.serialise(serial=8)))
    big = new_method_return(call(), "v", (("s", "big-endian"),))
    big.header.fields[HeaderFields.reply_serial] = 9
    big.header.endianness = Endianness.big
    raw = big.serialise(serial=10)
    assert raw[:1] == b"B"
    assert _messages(bytearray(raw)) == ([(9, "big-endian")], len(raw))
    assert systemd._as_text(True) == "yes"
