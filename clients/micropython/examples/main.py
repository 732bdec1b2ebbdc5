# main.py: starts the board's tether link at power-up, with the hardware watchdog,
# and runs its app. Settings come from local.json beside it.
#
# On the board (see "Starting at boot" in clients/micropython/README.md):
#   /boot.py         examples/boot.py
#   /main.py         this file
#   /local.json      the settings (below)
#   /lib/tether_client.py   (mpremote mip install …, or frozen into the firmware)
#   /app.py          your app: a module with  async def main(client)
#
# local.json holds the Client's settings, as Client.from_config reads them:
#   "id" (with its secret: "lamp-1@…" from `tether secret`), "server", "port",
#   "ssid", "pw", "timeout", "failover"
# and, for this file, all optional:
#   "app"            module whose async main(client) is the board's work (default "app")
#   "wdog"           start the watchdog (default true)
#   "verbose"        the client prints what it does (default false)
#   "grace"          seconds to press Ctrl-C for the REPL before anything starts (default 3)
#   "restart_after"  seconds from an app failure to the board's reset (default 10)
#
# Problems with the settings (no local.json, bad JSON, no "id" or "server", no app
# module) stop here with a message and leave the REPL free: a restart would not fix
# them. Once the client runs, so does the watchdog: a board whose loop hangs is reset
# by it, and an app that raises or returns is reported and the board reset.
import sys
import time
import asyncio

CONFIG = 'local.json'


class SetupError(Exception):
    pass


def settings(path=CONFIG):
    import json

    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError:
        raise SetupError('no %s on the board: copy local.example.json there as %s and fill it in' % (path, path))
    except ValueError as e:
        raise SetupError('%s is not valid JSON (%s): fix it (mpremote edit :%s)' % (path, e, path))
    if not isinstance(cfg, dict) or not (cfg.get('id') or cfg.get('my_id')) or not cfg.get('server'):
        raise SetupError('%s needs at least "id" and "server" (see local.example.json)' % path)
    return cfg


def app_module(cfg):
    name = cfg.get('app', 'app')
    try:
        mod = __import__(name)
    except ImportError as e:
        raise SetupError('cannot import the app module "%s" (%s): copy %s.py to the board, or name another in "app"' % (name, e, name))
    if not hasattr(mod, 'main'):
        raise SetupError('the app module "%s" has no main(client): add  async def main(client): ...' % name)
    return mod


def setup(path=CONFIG):
    # Everything that can be wrong with the settings, before anything runs. The
    # watchdog starts at the end, with the client (which feeds it from its loops).
    cfg = settings(path)
    app = app_module(cfg)
    from tether_client import Client

    wdog = cfg.get('wdog', True)
    try:
        client = Client.from_config(path, wdog=wdog, verbose=cfg.get('verbose', False))
    except ValueError as e:
        raise SetupError('%s: %s' % (path, e))
    name = str(cfg.get('id') or cfg.get('my_id')).split('@')[0]  # never print the secret
    print('tether: board', name, 'server', client.server, 'app', app.__name__, 'watchdog', 'on' if wdog else 'off')
    return cfg, app, client


async def main(path=CONFIG, ready=None):
    cfg, app, client = ready or setup(path)
    try:
        await app.main(client)
        print('tether: the app returned')
    except Exception as e:
        print('tether: the app failed:')
        sys.print_exception(e)
    # The client keeps feeding the watchdog meanwhile; then a clean start.
    delay = cfg.get('restart_after', 10)
    print('tether: resetting the board in', delay, 's')
    await asyncio.sleep(delay)
    import machine

    machine.reset()


GRACE = 3  # default of "grace"


def run(path=CONFIG):
    try:
        grace = settings(path).get('grace', GRACE)
        if grace:
            print('tether: starting in %s s; Ctrl-C now for the REPL (later the watchdog resets a stopped board)' % grace)
            time.sleep(grace)
        ready = setup(path)
    except SetupError as e:
        print('main.py:', e)
        return
    asyncio.run(main(path, ready))


if __name__ == '__main__':
    run()
