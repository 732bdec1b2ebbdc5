# Device half of examples/json-exchange.ts: every 4 s send [connects, count,
# uptime s] with qos; print the [count, received] lists the server app sends.
# On a board:  import json_exchange; json_exchange.run()
import asyncio
import json
import time
from tether_client import Client

PERIOD_MS = 4000


async def reader(client):
    while True:
        line = await client.readline()
        print('got', json.loads(line))


async def main(client, count=None):
    await client
    asyncio.create_task(reader(client))
    start = time.ticks_ms()
    n = 0
    while count is None or n < count:
        uptime = time.ticks_diff(time.ticks_ms(), start) // 1000
        await client.write(json.dumps([client.connects, n, uptime]))
        n += 1
        await asyncio.sleep_ms(PERIOD_MS)


def run(config='local.json'):
    asyncio.run(main(Client.from_config(config)))
