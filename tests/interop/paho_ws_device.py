#!/usr/bin/env python3
"""The paho_device.py device over MQTT over WebSocket (paho's transport="websockets").

Same arguments, output and exit status as paho_device.py (which see), plus:
  --path PATH   the WebSocket request path (default /mqtt)
paho offers the WebSocket subprotocol "mqtt" itself. TLS is paho_device.py's: TLS 1.3
only, the device certificate as client certificate, the server name checked.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import paho_device  # noqa: E402  (the directory is put on the path first)

mqtt = paho_device.mqtt


def main(argv):
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--path", default="/mqtt")
    ours, rest = parser.parse_known_args(argv)

    def new_client(client_id):
        kwargs = dict(client_id=client_id, clean_session=True, protocol=mqtt.MQTTv311,
                      transport="websockets")
        if hasattr(mqtt, "CallbackAPIVersion"):  # paho-mqtt 2.x
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
        else:
            client = mqtt.Client(**kwargs)
        client.ws_set_options(path=ours.path)
        return client

    # paho_device.main builds its client through this module-level function.
    paho_device.new_client = new_client
    return paho_device.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
