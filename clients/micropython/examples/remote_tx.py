# Device half of examples/remote-control.ts, the "tx" board: a push button
# (to GND, internal pull-up) whose presses go to the server, which relays them
# to the "rx" board's LED. On a board:  import remote_tx; remote_tx.run()
import asyncio
import json
from machine import Pin
from tether_client import Client


async def main(client, button):
    await client
    last = button()
    while True:
        now = button()
        if now != last:  # 0 = pressed (pulled up)
            last = now
            await client.write(json.dumps({'button': 'down' if now == 0 else 'up'}))
        await asyncio.sleep_ms(50)  # also debounces


def run(config='local.json', pin=0):
    asyncio.run(main(Client.from_config(config, my_id='tx'), Pin(pin, Pin.IN, Pin.PULL_UP)))
