# Device half of examples/remote-control.ts, the "rx" board: switches its LED
# as the server says and reports the new state back.
# On a board:  import remote_rx; remote_rx.run()
import asyncio
import json
from machine import Pin
from tether_client import Client


async def main(client, led):
    await client
    while True:
        cmd = json.loads(await client.readline())
        led(1 if cmd['led'] == 'on' else 0)
        await client.write(json.dumps({'led': cmd['led']}))


def run(config='local.json', pin=2):
    asyncio.run(main(Client.from_config(config, my_id='rx'), Pin(pin, Pin.OUT)))
