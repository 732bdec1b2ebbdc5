# boot.py: runs first at every start, before main.py. Kept to what cannot fail, since
# nothing here is guarded: the tether client and the watchdog start in main.py.
try:
    import esp

    esp.osdebug(None)  # no vendor debug messages on the serial port (ESP8266/ESP32)
except (ImportError, AttributeError):
    pass

import gc

gc.collect()
