#!/usr/bin/env python3
"""A device built on Eclipse Paho (paho-mqtt 1.6 or 2.x) for blindgate's interop tests.

Connects to the gateway's device listener over TLS 1.3 with the device's certificate,
publishes sealed E3 envelopes (produced beforehand by `blindgate e3 seal`; this script
does no cryptography) to e3/<device>/up with QoS 1 and waits for every PUBACK.
Optionally subscribes to e3/<device>/down and prints what arrives.

Output (stdout, one line each, flushed):
  subscribed          the SUBACK for e3/<device>/down arrived (--subscribe only)
  acked <n>           the PUBACK for the n-th envelope (1-based, in send order)
  done <count>        every envelope was acknowledged
  down <hex>          a downlink payload (--subscribe only)
Exit status: 0 on success; 1 on a connection failure, refusal, unexpected disconnect
or timeout (with a message on stderr); 2 on bad arguments.
"""

import argparse
import os
import ssl
import sys
import threading
import time

try:
    import paho.mqtt.client as mqtt
except ImportError:
    sys.exit("paho_device: paho-mqtt is not installed; run .ci/install-test-deps")

_print_lock = threading.Lock()


def emit(line):
    with _print_lock:
        print(line, flush=True)


def fail(message):
    with _print_lock:
        print(f"paho_device: {message}", file=sys.stderr, flush=True)
    os._exit(1)  # also from paho's network thread, without waiting for it


def _network_thread_died(hook):
    # paho 1.6 lets a TLS error (such as an alert for a refused client certificate)
    # end its network thread silently; treat it as the connection failure it is.
    fail(f"connection failed: {hook.exc_value}")


def code_of(reason):
    """An int from a 1.6 return code or a 2.x ReasonCode."""
    return getattr(reason, "value", reason)


class _ServerNameContext(ssl.SSLContext):
    """Checks the server certificate against `server_name` whatever host paho dials,
    so the device can dial 127.0.0.1 and still verify the name `localhost`."""

    server_name = "localhost"

    def wrap_socket(self, sock, *args, **kwargs):
        kwargs["server_hostname"] = self.server_name
        return super().wrap_socket(sock, *args, **kwargs)


def tls_context(args):
    context = _ServerNameContext(ssl.PROTOCOL_TLS_CLIENT)
    context.server_name = args.server_name
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=args.ca)
    context.load_cert_chain(certfile=args.cert, keyfile=args.key)
    return context


def new_client(client_id):
    if hasattr(mqtt, "CallbackAPIVersion"):  # paho-mqtt 2.x
        return mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
    return mqtt.Client(client_id=client_id, clean_session=True, protocol=mqtt.MQTTv311)


def envelope_files(args):
    files = list(args.files)
    if args.envelopes:
        names = sorted(os.listdir(args.envelopes))
        files += [os.path.join(args.envelopes, n) for n in names
                  if os.path.isfile(os.path.join(args.envelopes, n))]
    return files


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Paho MQTT device: publish sealed E3 envelopes to the gateway "
        "over TLS 1.3 with QoS 1 and wait for every PUBACK.")
    parser.add_argument("files", nargs="*", help="envelope files, published in this order")
    parser.add_argument("--envelopes", metavar="DIR",
                        help="also publish every file in DIR, sorted by name")
    parser.add_argument("--host", default="127.0.0.1", help="address to dial (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="the gateway's device port")
    parser.add_argument("--server-name", default="localhost",
                        help="name the server certificate must hold (default localhost)")
    parser.add_argument("--ca", required=True, help="device CA (device-ca.pem)")
    parser.add_argument("--cert", required=True, help="device certificate (devices/<id>.pem)")
    parser.add_argument("--key", required=True, help="device key (devices/<id>.key)")
    parser.add_argument("--device", required=True, help="device id (topic e3/<id>/up)")
    parser.add_argument("--client-id", help="MQTT client id (default: the device id)")
    parser.add_argument("--subscribe", action="store_true",
                        help="subscribe to e3/<device>/down and print 'down <hex>' per message")
    parser.add_argument("--expect", type=int, metavar="N",
                        help="with --subscribe: wait for N downlink messages (fail if fewer "
                        "arrive in time); without it, listen until --timeout")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds for connecting, all PUBACKs, and downlink (default 30)")
    parser.add_argument("--inflight", type=int, default=20,
                        help="publishes in flight at once (default 20)")
    args = parser.parse_args(argv)
    if args.expect is not None and not args.subscribe:
        parser.error("--expect needs --subscribe")
    return args


def main(argv):
    args = parse_args(argv)
    try:
        payloads = [open(path, "rb").read() for path in envelope_files(args)]
    except OSError as e:
        fail(f"cannot read envelope: {e}")
    up_topic = f"e3/{args.device}/up"
    down_topic = f"e3/{args.device}/down"

    state = threading.Condition()
    connected = {"rc": None}
    subscribed = threading.Event()
    closing = threading.Event()
    mid_index = {}  # message id -> 1-based envelope index
    acked = set()
    downs = []

    def on_connect(client, userdata, flags, rc, properties=None):
        with state:
            connected["rc"] = code_of(rc)
            state.notify_all()

    def on_disconnect(client, userdata, *rest):
        if not closing.is_set():
            # 1.6: (rc); 2.x: (flags, reason_code, properties)
            reason = rest[1] if len(rest) >= 2 else (rest[0] if rest else "?")
            if connected["rc"] is None:
                fail(f"connection closed before the CONNACK ({reason}); "
                     "was the client certificate refused?")
            fail(f"disconnected unexpectedly ({reason})")

    def on_subscribe(client, userdata, mid, granted, properties=None):
        codes = [code_of(g) for g in granted]
        if any(c >= 0x80 for c in codes):
            fail(f"subscription to {down_topic} refused ({codes})")
        emit("subscribed")
        subscribed.set()

    def on_publish(client, userdata, mid, *rest):
        with state:
            # on_publish can run before publish() returned the mid: record it anyway.
            acked.add(mid)
            state.notify_all()

    def on_message(client, userdata, message):
        emit(f"down {message.payload.hex()}")
        with state:
            downs.append(message.payload)
            state.notify_all()

    threading.excepthook = _network_thread_died
    client = new_client(args.client_id or args.device)
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_subscribe = on_subscribe
    client.on_publish = on_publish
    client.on_message = on_message
    client.max_inflight_messages_set(args.inflight)
    client.max_queued_messages_set(0)
    try:
        client.tls_set_context(tls_context(args))
        client.tls_insecure_set(False)
    except (OSError, ssl.SSLError) as e:
        fail(f"TLS set-up: {e}")

    deadline = time.monotonic() + args.timeout

    def remaining():
        return max(0.0, deadline - time.monotonic())

    try:
        client.connect(args.host, args.port, keepalive=30)
    except (OSError, ssl.SSLError, ssl.CertificateError) as e:
        fail(f"cannot connect to {args.host}:{args.port}: {e}")
    client.loop_start()
    with state:
        if not state.wait_for(lambda: connected["rc"] is not None, remaining()):
            fail("no CONNACK before the timeout")
        if connected["rc"] != 0:
            fail(f"connection refused (CONNACK {connected['rc']})")

    if args.subscribe:
        client.subscribe(down_topic, qos=1)
        if not subscribed.wait(remaining()):
            fail("no SUBACK before the timeout")

    infos = [client.publish(up_topic, payload, qos=1) for payload in payloads]
    for index, info in enumerate(infos, start=1):
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            fail(f"publish {index} not queued: {mqtt.error_string(info.rc)}")
        mid_index[info.mid] = index
    reported = set()
    with state:
        while True:
            for mid in sorted(acked - reported, key=lambda m: mid_index.get(m, 0)):
                if mid in mid_index:
                    emit(f"acked {mid_index[mid]}")
                    reported.add(mid)
            if len(reported) == len(infos):
                break
            if not state.wait(remaining()) and remaining() == 0:
                fail(f"{len(infos) - len(reported)} of {len(infos)} publishes not "
                     "acknowledged before the timeout")
    emit(f"done {len(infos)}")

    if args.subscribe:
        with state:
            if args.expect is None:
                state.wait_for(lambda: False, remaining())
            elif not state.wait_for(lambda: len(downs) >= args.expect, remaining()):
                fail(f"{len(downs)} of {args.expect} downlink messages before the timeout")

    closing.set()
    client.disconnect()
    client.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
