# Device half of the qos demo (qos/qos.ts on the server): sends numbered qos
# messages {"n":0,"boot":"..."}, {"n":1,...}, ... and keeps statistics of the
# numbered messages the server sends back, as qos/stats.ts does: received,
# duplicates, missing (gaps not filled), out of order, server restarts (its boot
# changed, or n went back to 0 without one). Prints them every few seconds.
# Server:    npx tether serve --app qos/qos.ts=*
# On a board:  import qos; qos.run()
import asyncio
import json
import random
import time
from tether_client import Client

PERIOD_MS = 1000  # pause after each message
PRINT_MS = 5000  # statistics every this many ms
MAX_GAP = 200  # a wider jump is counted as missing without remembering each number


def new_boot():
    # Identifies this run: a restarted board shows up on the server as a new boot.
    return '%08x' % ((random.getrandbits(30) ^ time.ticks_us()) & 0x3FFFFFFF)


class Stats:
    def __init__(self):
        self.sent = 0  # messages sent and ACKed by the server
        self.received = 0  # messages read, duplicates included
        self.duplicates = 0
        self.out_of_order = 0
        self.restarts = 0
        self.invalid = 0  # lines that were not qos messages
        self.boot = None
        self.last = -1  # highest n of the current run
        self._started = False
        self._gaps = set()
        self._lost = 0  # gaps of earlier runs, and gaps too wide to track

    def missing(self):
        return self._lost + len(self._gaps)

    def take(self, line):
        try:
            m = json.loads(line)
            n = m['n']
            boot = m.get('boot')
            if type(n) is not int or n < 0 or (boot is not None and type(boot) is not str):
                raise ValueError
        except (ValueError, KeyError, TypeError, AttributeError):
            self.invalid += 1
            return 'invalid'
        self.received += 1
        if not self._started:  # first contact: count from here
            self._started = True
            self.boot = boot
            self.last = n
            return 'first'
        if boot is not None or self.boot is not None:
            restart = boot != self.boot
        else:
            restart = n == 0 and self.last > 0
        if restart:
            self.restarts += 1
            self._lost += len(self._gaps)
            self._gaps = set()
            self.boot = boot
            self.last = -1
            self._advance(n)
            return 'restart'
        if n > self.last:
            return 'skip' if self._advance(n) else 'new'
        if n in self._gaps:
            self._gaps.remove(n)
            self.out_of_order += 1
            return 'late'
        self.duplicates += 1
        return 'duplicate'

    def _advance(self, n):
        skipped = n - self.last - 1
        if skipped > MAX_GAP:
            self._lost += skipped
        else:
            for i in range(self.last + 1, n):
                self._gaps.add(i)
        self.last = n
        return skipped > 0

    def state(self):
        return {'sent': self.sent, 'received': self.received, 'duplicates': self.duplicates,
                'missing': self.missing(), 'out_of_order': self.out_of_order,
                'restarts': self.restarts, 'invalid': self.invalid}

    def show(self, client=None):
        print('qos: sent %d received %d dupes %d missing %d out-of-order %d restarts %d invalid %d%s' % (
            self.sent, self.received, self.duplicates, self.missing(), self.out_of_order,
            self.restarts, self.invalid, '' if client is None else ' connects %d' % client.connects))


stats = Stats()


async def reader(client):
    while True:
        stats.take(await client.readline())


async def printer(client):
    while True:
        await asyncio.sleep_ms(PRINT_MS)
        stats.show(client)


async def main(client, count=None):
    boot = new_boot()
    await client
    asyncio.create_task(reader(client))
    asyncio.create_task(printer(client))
    n = 0
    while count is None or n < count:
        await client.write('{"n":%d,"boot":"%s"}' % (n, boot))  # as JSON.stringify({ n, boot })
        n += 1
        stats.sent = n
        await asyncio.sleep_ms(PERIOD_MS)
    stats.show(client)


def run(config='local.json'):
    client = Client.from_config(config)
    try:
        asyncio.run(main(client))
    finally:
        stats.show(client)
