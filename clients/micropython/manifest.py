# Freezes the tether client into a MicroPython firmware (ESP8266 above all: frozen
# bytecode runs from flash, so the ~23 KB the module costs in RAM when loaded from a
# file stays free). Build from the MicroPython source tree, not from here:
#
#   cd micropython/ports/esp8266
#   make BOARD=ESP8266_GENERIC FROZEN_MANIFEST=/path/to/tether/clients/micropython/manifest.py
#
# Steps, toolchain and flashing: "Freezing it into ESP8266 firmware" in README.md here.
# Paths below are relative to this file.

# Everything the board's standard firmware freezes (asyncio, the port's _boot.py,
# its filesystem set-up…): without it the firmware would lack them.
include("$(BOARD_DIR)/manifest.py")

# The client itself.
module("tether_client.py")

# Optional: freeze the app that main.py runs too (any module with async main(client)),
# e.g. the JSON example, by removing the "#":
# module("json_exchange.py", base_path="examples")
