# Test stand-in for a MicroPython board's `socket` module, for a NON-BLOCKING
# TCP client. The bytes travel over real Node sockets (see
# test/helpers/micropython-worker.js); only loopback addresses are reachable.
# Blocking I/O cannot be modelled in WebAssembly (nothing else would run), so
# it raises OSError(EINVAL) with a message saying so.
import io
import binascii

try:
    import tether_host

    _net = tether_host.net
except ImportError:
    import js

    _net = js.tetherHostNet

AF_INET = 2
AF_INET6 = 10
SOCK_STREAM = 1
SOCK_DGRAM = 2
SOCK_RAW = 3
SOL_SOCKET = 1
SO_REUSEADDR = 4
IPPROTO_TCP = 6
IPPROTO_UDP = 17

_EBADF = 9
_EAGAIN = 11
_EINVAL = 22
_EINPROGRESS = 115
_MP_STREAM_FLUSH = 1
_MP_STREAM_POLL = 3
_MP_STREAM_CLOSE = 4
_MAX_WRITE = 65536  # a write never takes more than this at once


def getaddrinfo(host, port, af=0, type=0, proto=0, flags=0):
    return [(AF_INET, SOCK_STREAM, 0, '', (host, port))]


class socket(io.IOBase):
    def __init__(self, af=AF_INET, type=SOCK_STREAM, proto=0):
        if type != SOCK_STREAM:
            raise OSError(_EINVAL, 'tether harness socket: only SOCK_STREAM is supported')
        self._h = _net.open()
        self._blocking = True  # as on a board; call setblocking(False)
        self._closed = False

    def _usable(self, what):
        if self._closed:
            raise OSError(_EBADF)
        if self._blocking:
            raise OSError(
                _EINVAL,
                'tether harness socket: blocking %s is not supported, call setblocking(False) first' % what,
            )

    def setblocking(self, flag):
        self._blocking = bool(flag)

    def settimeout(self, value):
        # 0 means non-blocking; None or a timeout means blocking (not supported for I/O).
        self._blocking = value is None or value > 0

    def setsockopt(self, level, opt, value):
        pass

    def connect(self, addr):
        self._usable('connect')
        r = _net.connect(self._h, str(addr[0]), int(addr[1]))
        raise OSError(r or _EINPROGRESS)

    def ioctl(self, req, arg):
        if req == _MP_STREAM_POLL:
            return _net.poll(self._h, arg)
        if req == _MP_STREAM_CLOSE:
            self.close()
            return 0
        if req == _MP_STREAM_FLUSH:
            return 0
        return -1

    def _read(self, n):
        # bytes, b'' at end of stream, or None when nothing is buffered yet.
        r = _net.read(self._h, n)
        if r is None:
            return None
        if isinstance(r, int):
            if r == 0:
                return b''
            raise OSError(-r)
        return bytes(r)

    def readinto(self, buf, nbytes=-1):
        self._usable('read')
        n = len(buf) if nbytes < 0 else min(nbytes, len(buf))
        if n == 0:
            return 0
        data = self._read(n)
        if data is None:
            return None
        k = len(data)
        if k:
            buf[0:k] = data
        return k

    def read(self, n=-1):
        self._usable('read')
        return self._read(n if n >= 0 else 0x7FFFFFFF)

    def recv(self, n):
        self._usable('recv')
        data = self._read(n)
        if data is None:
            raise OSError(_EAGAIN)
        return data

    def write(self, buf):
        self._usable('write')
        if isinstance(buf, str):
            buf = buf.encode()
        if len(buf) == 0:
            return 0
        r = _net.write(self._h, binascii.hexlify(memoryview(buf)[:_MAX_WRITE]).decode())
        if r is None or r == 0:
            return None
        if r < 0:
            raise OSError(-r)
        return r

    def send(self, buf):
        n = self.write(buf)
        if n is None:
            raise OSError(_EAGAIN)
        return n

    def close(self):
        if not self._closed:
            self._closed = True
            _net.close(self._h)

    def __repr__(self):
        return '<socket %d %s>' % (self._h, _net.describe(self._h))
