/**
 * The real browser the dashboard tests drive: Debian's Chromium through
 * playwright-core (which never downloads a browser of its own).
 */
import * as fs from 'node:fs';
import { chromium, Browser } from 'playwright-core';

/** Debian's package puts it here; TETHER_CHROMIUM points elsewhere (another distribution's Chromium). */
export const CHROMIUM = process.env.TETHER_CHROMIUM || '/usr/bin/chromium';

/** Headless, and nothing that would reach beyond this machine. */
export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

export async function launchChromium(extraArgs: string[] = []): Promise<Browser> {
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: the dashboard tests need a real Chromium; run \`apt-get install chromium\` (.ci/run does)`);
  }
  return chromium.launch({ executablePath: CHROMIUM, args: [...CHROMIUM_ARGS, ...extraArgs], timeout: 60_000 });
}
