# Test stand-in for a MicroPython board's `network` module: one station
# interface whose link the test controls (mp.wifi.setUp in
# test/helpers/micropython.ts). connect() joins after a short delay, and only
# while the test has the link up; active(True) also auto-joins with "stored"
# credentials, as an ESP8266 does. Status codes are the ESP32 ones.
try:
    import tether_host

    _wifi = tether_host.wifi
    _machine = tether_host.machine
except ImportError:
    import js

    _wifi = js.tetherHostWifi
    _machine = js.tetherHostMachine

import binascii

STA_IF = 0
AP_IF = 1

STAT_IDLE = 1000
STAT_CONNECTING = 1001
STAT_GOT_IP = 1010
STAT_NO_AP_FOUND = 201
STAT_WRONG_PASSWORD = 202
STAT_BEACON_TIMEOUT = 200
STAT_ASSOC_FAIL = 203
STAT_HANDSHAKE_TIMEOUT = 204

_hostname = 'tether-test'


def hostname(name=None):
    global _hostname
    if name is None:
        return _hostname
    _hostname = name


class WLAN:
    def __init__(self, interface=STA_IF):
        self._if = interface

    def active(self, flag=None):
        if flag is None:
            return bool(_wifi.isActive(self._if))
        _wifi.setActive(self._if, bool(flag))

    def connect(self, ssid=None, key=None, *, bssid=None):
        if self._if != STA_IF:
            raise OSError('tether harness: connect() on the AP interface')
        if not _wifi.connect(ssid, key):
            raise OSError('Wifi Not Started')  # the ESP32 message when not active

    def disconnect(self):
        if self._if == STA_IF:
            _wifi.disconnect()

    def isconnected(self):
        if self._if != STA_IF:
            return False
        return bool(_wifi.isConnected())

    def status(self, param=None):
        if param == 'rssi':
            return -50
        if param is not None:
            raise ValueError('unknown status param')
        if self._if != STA_IF:
            return STAT_IDLE
        return _wifi.status()

    def ifconfig(self, config=None):
        if config is not None:
            return None
        if self._if == STA_IF and not _wifi.isConnected():
            return ('0.0.0.0', '0.0.0.0', '0.0.0.0', '0.0.0.0')
        return ('127.0.0.1', '255.0.0.0', '127.0.0.1', '127.0.0.1')

    def config(self, *args, **kwargs):
        if kwargs:
            return None
        if len(args) != 1:
            raise ValueError('config() takes one parameter name or keyword settings')
        p = args[0]
        if p == 'mac':
            return binascii.unhexlify(_machine.uniqueId())
        if p in ('ssid', 'essid'):
            return _wifi.ssid() or ''
        if p in ('hostname', 'dhcp_hostname'):
            return _hostname
        if p == 'channel':
            return 1
        if p == 'txpower':
            return 20
        raise ValueError('unknown config param')

    def scan(self):
        return []
