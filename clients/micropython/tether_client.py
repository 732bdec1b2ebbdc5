# tether_client.py: the device side of the micropython-iot line protocol, for
# ESP8266 and ESP32 boards running MicroPython >= 1.20. Works with tether and
# with the original Python server. See README.md beside this file.
#
#   from tether_client import Client
#   c = Client('board-1', '192.168.0.10', ssid='net', pw='secret')
#   await c                     # waits until the link is up
#   await c.write('hello')      # qos: resolves once the server ACKed it
#   line = await c.readline()   # 'text\n'
#
# Several gateways: Client('board-1', ['192.168.0.10', ('192.168.0.11', 8124)])
# moves on to the next address after `failover` failed attempts in a row.

import asyncio
import errno
import select
import socket
import time
import network
from micropython import const

_POLL_MS = const(20)  # how often the link loop looks at an idle socket
_RBUF = const(128)  # bytes taken from the socket per read
_WIFI_MS = const(20000)  # one WiFi connect attempt, before bad_wifi()
_SEND_PAUSE = const(20)  # pause while the socket's send buffer is full
_WINDOW = const(8)  # unACKed qos messages in flight with wait=False
_HEX = b'0123456789abcdef'


def _nibble(c):
    if 48 <= c <= 57:
        return c - 48
    c |= 32
    return c - 87 if 97 <= c <= 102 else -1


def _mid_of(line):
    # The two leading hex digits as a number, or -1.
    hi = _nibble(line[0])
    lo = _nibble(line[1])
    return -1 if hi < 0 or lo < 0 else (hi << 4) | lo


def _is_new(ring, mid):
    # The duplicate ring of PROTOCOL.md 1.3: mid 0 clears it; a mid is new if
    # its bit is clear; seeing it sets the bit and clears the byte half a ring away.
    if mid == 0:
        for i in range(32):
            ring[i] = 0
    i = mid >> 3
    bit = 1 << (mid & 7)
    new = not ring[i] & bit
    ring[i] |= bit
    ring[(i + 16) & 31] = 0
    return new


def _only_zero(ring):
    if ring[0] != 1:
        return False
    for i in range(1, 32):
        if ring[i]:
            return False
    return True


class Client:
    def __init__(self, my_id, server, port=8123, ssid='', pw='', timeout=2000,
                 conn_cb=None, conn_cb_args=None, verbose=False, led=None,
                 wdog=False, rxq=20, max_line=1024, failover=3):
        if not my_id or '\n' in my_id:
            raise ValueError('my_id must be a non-empty string without a newline')
        if not server:
            raise ValueError('no server address')
        self._id = my_id.encode() + b'\n'
        # `server` is kept as given (a host, or a list of hosts and (host, port)
        # pairs); an address is worked out only when it is dialled.
        self._srv = server
        self._port = port
        self._si = 0  # index of the server in use
        self._fails = 0  # failed attempts in a row on that server
        self._fo = failover
        if not isinstance(server, str):
            for i in range(len(server)):
                self._addr(i)  # a bad entry fails here, not at the first failover
        self._ssid = ssid
        self._pw = pw
        self._to = timeout
        self._cb = conn_cb
        self._cb_args = conn_cb_args or ()
        self._verbose = verbose
        self._led = led
        self._wdt = None
        if wdog:
            import machine
            try:
                self._wdt = machine.WDT(timeout=20000)  # ESP32
            except TypeError:
                self._wdt = machine.WDT()  # ESP8266: fixed period
        self._rxmax = rxq
        self._maxl = max_line
        self._sta = network.WLAN(network.STA_IF)
        self._sock = None
        self._up = False
        self._bad = False  # a send failed: the link loop ends the link
        self._closed = False
        self._task = None
        self.connects = 0  # times the link came up
        self.dropped = 0  # messages refused (not ACKed) because the queue was full
        self._mid = 0  # next message id: 0 once, then 1..255, 1..
        self._ring = bytearray(32)  # ids seen (duplicate filter)
        self._pend = bytearray(32)  # ids sent with qos and not yet ACKed
        self._npend = 0
        self._zero = None  # payload of the last mid-0 message taken
        self._q = []  # received lines, str with '\n'
        self._qev = asyncio.Event()
        self._wl = asyncio.Lock()  # one line on the socket at a time
        self._rbuf = bytearray(_RBUF)
        self._ack = bytearray(b'00\n')
        self._part = bytearray()  # the line being received
        self._skip = False  # skipping a line longer than max_line
        self._rx_t = self._tx_t = time.ticks_ms()
        self._backoff = 500

    @classmethod
    def from_config(cls, path='local.json', **kw):
        # Settings from a JSON file: id, server, port, ssid, pw, timeout,
        # failover; keyword arguments override them. "server" may be a list, as
        # in the constructor (pairs are JSON lists: ["10.0.0.3", 8124]).
        import json
        with open(path) as f:
            cfg = json.load(f)
        args = {'port': cfg.get('port', 8123), 'ssid': cfg.get('ssid', ''),
                'pw': cfg.get('pw', ''), 'timeout': cfg.get('timeout', 2000),
                'failover': cfg.get('failover', 3)}
        args.update(kw)
        my_id = args.pop('my_id', None) or cfg.get('id') or cfg.get('my_id')
        server = args.pop('server', None) or cfg.get('server')
        return cls(my_id, server, **args)

    # ---- API -------------------------------------------------------------

    def __iter__(self):  # await client: starts it once, waits for the link
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        while not self._up:
            if self._closed:
                raise OSError(errno.ENOTCONN)
            yield from asyncio.sleep_ms(_POLL_MS)

    __await__ = __iter__

    def status(self):
        return self._up

    @property
    def server(self):  # (host, port) of the server in use or being tried
        return self._addr(self._si)

    async def readline(self):
        while not self._q:
            self._qev.clear()
            await self._qev.wait()
        return self._q.pop(0)

    async def write(self, buf, qos=True, wait=True):
        if isinstance(buf, str):
            buf = buf.encode()
        if buf.endswith(b'\n'):
            buf = buf[:-1]
        if not buf:
            raise ValueError('empty line: it would read as an ACK')
        if b'\n' in buf:
            raise ValueError('newline inside a line: split it or encode it')
        if len(buf) + 2 > self._maxl:
            raise ValueError('line longer than max_line')
        if qos:
            while self._npend >= (1 if wait else _WINDOW):
                await asyncio.sleep_ms(_POLL_MS)
        mid = self._mid
        self._mid = 1 if mid >= 255 else mid + 1
        line = bytearray(len(buf) + 3)
        line[0] = _HEX[mid >> 4]
        line[1] = _HEX[mid & 15]
        line[2:-1] = buf
        line[-1] = 10
        if qos:
            self._pend[mid >> 3] |= 1 << (mid & 7)
            self._npend += 1
        while not (self._up and await self._send(line)):
            if self._closed:
                raise OSError(errno.ENOTCONN)
            await asyncio.sleep_ms(_POLL_MS)
        if not qos:
            return
        # Resend after every timeout without ACK and after every reconnect.
        c = self.connects
        t = time.ticks_ms()
        while self._pend[mid >> 3] & (1 << (mid & 7)):
            if self._closed:
                raise OSError(errno.ENOTCONN)
            await asyncio.sleep_ms(_POLL_MS)
            if self._up and (c != self.connects or time.ticks_diff(time.ticks_ms(), t) >= self._to):
                c = self.connects
                t = time.ticks_ms()
                await self._send(line)

    def close(self):
        self._closed = True
        self._drop()

    # Overridable: what to do when WiFi or the server cannot be reached. The
    # defaults wait and let the client retry; raise from them to give up.
    async def bad_wifi(self):
        self._log('WiFi not connected: retrying')
        await asyncio.sleep_ms(1000)

    async def bad_server(self):
        self._log('server not reachable: retrying in', self._backoff, 'ms')
        await asyncio.sleep_ms(self._backoff)
        self._backoff = min(self._backoff * 2, 30000)

    # ---- internals ---------------------------------------------------------

    def _log(self, *args):
        if self._verbose:
            print('tether:', *args)

    def _feed(self):
        if self._wdt:
            self._wdt.feed()

    def _addr(self, i):
        # Entry i of the server list as (host, port); a plain host uses `port`.
        a = self._srv
        if not isinstance(a, str):
            a = a[i]
        if isinstance(a, str):
            return a, self._port
        if isinstance(a, (tuple, list)) and len(a) == 2 and isinstance(a[0], str) and isinstance(a[1], int):
            return a[0], a[1]
        raise ValueError('server: a host, or a list of hosts and (host, port) pairs')

    def _failed(self):
        # One more attempt on the current server came to nothing. After `failover`
        # of them in a row, the next server in the list gets its turn (wrapping).
        self._fails += 1
        n = 1 if isinstance(self._srv, str) else len(self._srv)
        if n > 1 and self._fails >= self._fo:
            self._log('server', self.server, 'failed', self._fails, 'times in a row: moving to',
                      self._addr((self._si + 1) % n))
            self._fails = 0
            self._si = (self._si + 1) % n

    async def _run(self):
        while not self._closed:
            await self._wifi()
            try:
                s = await self._dial()
            except OSError as e:
                self._log('connect failed', e)
                if not self._closed:
                    await self.bad_server()  # self.server is still the one that failed
                    self._failed()
                continue
            self._sock = s
            self._bad = False
            was_up = await self._link(s)
            self._drop()
            if self._closed:
                break
            if not was_up:
                # Connected, but the link never came up (the server refused the ID or
                # its secret, or went away): back off as for a refused connect, so a
                # refused board does not redial in a tight loop.
                if not self._closed:
                    await self.bad_server()
                    self._failed()
                continue
            # The link was up: the first retry goes to the same server, as the
            # outage may have been WiFi rather than the gateway.
            self._fails = 0
            self._backoff = 500
            await asyncio.sleep_ms(2 * self._to)  # as the original: let the server see the outage

    async def _wifi(self):
        sta = self._sta
        while not sta.isconnected() and not self._closed:
            sta.active(True)
            if self._ssid:  # ESP32 needs them; ESP8266 also reconnects with stored ones
                try:
                    sta.connect(self._ssid, self._pw)
                except OSError as e:
                    self._log('WiFi connect error', e)
            t = time.ticks_ms()
            while not sta.isconnected() and time.ticks_diff(time.ticks_ms(), t) < _WIFI_MS:
                self._feed()
                await asyncio.sleep_ms(100)
            if not sta.isconnected():
                await self.bad_wifi()

    async def _dial(self):
        host, port = self.server
        addr = socket.getaddrinfo(host, port)[0][-1]
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(addr)
        except OSError as e:
            if e.args[0] != errno.EINPROGRESS:
                s.close()
                raise
        p = select.poll()
        p.register(s, select.POLLOUT)
        t = time.ticks_ms()
        while True:
            r = p.poll(0)
            if r:
                if r[0][1] & (select.POLLERR | select.POLLHUP):
                    s.close()
                    raise OSError(errno.ECONNREFUSED)
                return s
            if time.ticks_diff(time.ticks_ms(), t) > self._to:
                s.close()
                raise OSError(errno.ETIMEDOUT)
            self._feed()
            await asyncio.sleep_ms(_POLL_MS)

    async def _link(self, s):
        # One loop per link: read, keepalive, outage detection. Returns whether
        # the link came up (the server's first line arrived).
        self._part = bytearray()
        self._skip = False
        self._rx_t = time.ticks_ms()
        if not await self._send(self._id):
            return False
        while not (self._closed or self._bad):
            try:
                n = s.readinto(self._rbuf)
            except OSError:
                n = 0
            now = time.ticks_ms()
            if n is None:
                # First line may take 2 x timeout (as the original); then timeout.
                if time.ticks_diff(now, self._rx_t) > (self._to if self._up else 2 * self._to):
                    self._log('outage: no data for', time.ticks_diff(now, self._rx_t), 'ms')
                    break
            elif n == 0:
                self._log('server closed the link')
                break
            else:
                self._rx_t = now
                if not await self._take(n):
                    break
            if self._up and time.ticks_diff(now, self._tx_t) >= self._to // 4:
                if not await self._send(b'\n'):
                    break
            self._feed()
            await asyncio.sleep_ms(_POLL_MS if n is None else 0)
        return self._up

    async def _take(self, n):
        # Splits the bytes just read into lines.
        buf = self._rbuf
        mv = memoryview(buf)
        start = 0
        while start < n:
            i = buf.find(b'\n', start, n)
            end = n if i < 0 else i
            if not self._skip:
                if len(self._part) + end - start > self._maxl:
                    self._log('line longer than max_line: skipped')
                    self._skip = True
                    self._part = bytearray()
                else:
                    self._part.extend(mv[start:end])
            if i < 0:
                break
            start = i + 1
            if self._skip:
                self._skip = False
                continue
            line = self._part
            if line:
                self._part = bytearray()
            if not await self._line(line):
                return False
        return True

    async def _line(self, line):
        if not self._up:  # the server's first line: the link is up
            self._up = True
            self.connects += 1
            self._log('link up, connects', self.connects)
            self._notify(True)
        n = len(line)
        if n == 0:  # keepalive: heartbeat on the LED
            if self._led is not None:
                self._led(not self._led())
            return True
        mid = _mid_of(line) if n >= 2 else -1
        if mid < 0:
            self._log('bad line dropped')
            return True
        if n == 2:  # ACK
            i = mid >> 3
            bit = 1 << (mid & 7)
            if self._pend[i] & bit:
                self._pend[i] &= ~bit
                self._npend -= 1
            return True
        if len(self._q) >= self._rxmax:
            self.dropped += 1  # not ACKed: the server sends it again later
            return True
        ack = self._ack
        ack[0] = line[0]
        ack[1] = line[1]
        if not await self._send(ack):
            return False
        payload = line[2:]
        # A repeated first message (mid 0) whose ACK was lost is not a restart.
        if (mid == 0 and payload == self._zero and _only_zero(self._ring)) or not _is_new(self._ring, mid):
            return True
        if mid == 0:
            self._zero = payload
        self._q.append(str(payload, 'utf8') + '\n')
        self._qev.set()
        return True

    async def _send(self, buf):
        async with self._wl:
            s = self._sock
            if s is None or self._bad:
                return False
            mv = memoryview(buf)
            t = time.ticks_ms()
            while len(mv):
                try:
                    n = s.write(mv)
                except OSError:
                    n = -1
                if n is None:
                    n = 0
                if n < 0 or (n == 0 and time.ticks_diff(time.ticks_ms(), t) > self._to):
                    self._bad = True
                    return False
                mv = mv[n:]
                if len(mv):
                    await asyncio.sleep_ms(_SEND_PAUSE)
            self._tx_t = time.ticks_ms()
            return True

    def _drop(self):
        was = self._up
        self._up = False
        s = self._sock
        self._sock = None
        if s is not None:
            try:
                s.close()
            except OSError:
                pass
        if was:
            self._log('link down')
            self._notify(False)

    def _notify(self, state):
        if self._cb is None:
            return
        r = self._cb(state, *self._cb_args)
        if r is not None and hasattr(r, 'send'):  # a coroutine: run it
            asyncio.create_task(r)
