# Test stand-in for a MicroPython board's `machine` module: Pin writes, WDT
# feeds and resets are recorded in JS where the test reads them (mp.pins,
# mp.wdtFeeds, mp.resets in test/helpers/micropython.ts). Timer callbacks run
# from JS timers in the interpreter's worker.
try:
    import tether_host

    _m = tether_host.machine
except ImportError:
    import js

    _m = js.tetherHostMachine

import binascii

PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5

_freq = 160000000


class Pin:
    IN = 0
    OUT = 1
    OPEN_DRAIN = 2
    PULL_UP = 1
    PULL_DOWN = 2
    IRQ_FALLING = 1
    IRQ_RISING = 2

    # Argument order as on a board: Pin(id, mode, pull, *, value)
    def __init__(self, id, mode=-1, pull=-1, *, value=None, **kwargs):
        self._id = id
        self._mode = mode
        if value is not None:
            _m.pinWrite(str(id), 1 if value else 0, True)
        elif mode == Pin.OUT:
            _m.pinWrite(str(id), _m.pinRead(str(id)), True)

    def init(self, mode=-1, pull=-1, *, value=None, **kwargs):
        if mode != -1:
            self._mode = mode
        if value is not None:
            self.value(value)

    def value(self, v=None):
        if v is None:
            return _m.pinRead(str(self._id))
        _m.pinWrite(str(self._id), 1 if v else 0, False)

    def __call__(self, v=None):
        return self.value(v)

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)

    def toggle(self):
        self.value(0 if self.value() else 1)

    def irq(self, handler=None, trigger=3, **kwargs):
        return None

    def __repr__(self):
        return 'Pin(%r)' % (self._id,)


class WDT:
    def __init__(self, id=0, timeout=5000):
        self._timeout = timeout
        _m.wdtStart(timeout)

    def feed(self):
        _m.wdtFeed()


class Timer:
    ONE_SHOT = 0
    PERIODIC = 1

    def __init__(self, id=-1, **kwargs):
        self._id = id
        self._handle = 0
        if kwargs:
            self.init(**kwargs)

    def init(self, *, mode=PERIODIC, period=-1, freq=-1, callback=None):
        self.deinit()
        if freq > 0:
            period = max(1, 1000 // freq)
        if callback is None or period < 0:
            return
        self._handle = _m.timerStart(period, mode == Timer.PERIODIC, lambda: callback(self))

    def deinit(self):
        if self._handle:
            _m.timerStop(self._handle)
            self._handle = 0


def unique_id():
    return binascii.unhexlify(_m.uniqueId())


def reset():
    _m.reset('reset')
    raise SystemExit('machine.reset()')


def soft_reset():
    _m.reset('soft_reset')
    raise SystemExit('machine.soft_reset()')


def deepsleep(ms=0):
    _m.reset('deepsleep')
    raise SystemExit('machine.deepsleep()')


def reset_cause():
    return PWRON_RESET


def freq(hz=None):
    global _freq
    if hz is None:
        return _freq
    _freq = hz


def idle():
    pass


def disable_irq():
    return 0


def enable_irq(state=0):
    pass
