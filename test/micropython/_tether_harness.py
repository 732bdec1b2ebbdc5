# Harness-internal helpers (not a board module): moves values between the test
# process and the interpreter as JSON, with bytes carried as {"__bytes__": hex}.
import json
import binascii
import __main__

_G = __main__.__dict__


def _enc(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {'__bytes__': binascii.hexlify(bytes(v)).decode()}
    if isinstance(v, (list, tuple)):
        return [_enc(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _enc(x) for k, x in v.items()}
    return {'__repr__': repr(v)}


def _dec(v):
    if isinstance(v, list):
        return [_dec(x) for x in v]
    if isinstance(v, dict):
        if len(v) == 1 and '__bytes__' in v:
            return binascii.unhexlify(v['__bytes__'])
        return {k: _dec(x) for k, x in v.items()}
    return v


def encode(v):
    return json.dumps(_enc(v))


def _awaitable(v):
    # An async def called from here gives a generator; a Task is awaitable too.
    return hasattr(v, 'send') or hasattr(v, '__await__')


async def _finish(aw):
    return encode(await aw)


def _lookup(name):
    parts = name.split('.')
    if parts[0] in _G:
        obj = _G[parts[0]]
    else:
        try:
            obj = __import__(parts[0])
        except ImportError:
            raise NameError("name '%s' isn't defined" % parts[0])
    for p in parts[1:]:
        obj = getattr(obj, p)
    return obj


def invoke(name, args_json):
    r = _lookup(name)(*_dec(json.loads(args_json)))
    if _awaitable(r):
        return _finish(r)
    return encode(r)


def evaluate(expr):
    r = eval(expr, _G)
    if _awaitable(r):
        return _finish(r)
    return encode(r)
