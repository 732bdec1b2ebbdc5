/**
 * `tether service`: the systemd unit that runs `tether serve` at boot. The file
 * in deploy/tether.service is this function's output for a global npm install
 * (test/service.test.ts keeps the two the same and has systemd-analyze verify both).
 */
import * as path from 'node:path';

export interface UnitOptions {
  /** Folder with tether.json, apps/ and the journal; the service's working directory. Default /var/lib/tether. */
  dir?: string;
  /** System user the service runs as. Default tether. */
  user?: string;
  /** The command that runs tether (before `serve …`). Default `/usr/bin/env tether` (found on systemd's PATH). */
  exec?: string[];
}

export const UNIT_DEFAULTS = { dir: '/var/lib/tether', user: 'tether', exec: ['/usr/bin/env', 'tether'] };

/** Quotes one ExecStart word for systemd if it needs it. */
function word(s: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(s) ? s : `"${s.replace(/(["\\])/g, '\\$1')}"`;
}

export function serviceUnit(opts: UnitOptions = {}): string {
  const dir = path.resolve(opts.dir ?? UNIT_DEFAULTS.dir);
  const user = opts.user ?? UNIT_DEFAULTS.user;
  const exec = opts.exec ?? UNIT_DEFAULTS.exec;
  const config = path.join(dir, 'tether.json');
  // Under /var/lib, systemd creates the folder, gives it to the user and makes it writable; elsewhere it must exist.
  const state = /^\/var\/lib\/[^/]+$/.test(dir) ? `StateDirectory=${path.basename(dir)}` : `ReadWritePaths=${dir}`;
  // Node from nvm lives in a home folder: hiding /home would hide node itself.
  const underHome = [dir, ...exec].some((p) => /^\/(home|root)(\/|$)/.test(p));
  return `# tether as a systemd service: \`tether serve\` at boot, restarted if it fails.
# Install (docs/raspberry-pi.md has the whole procedure):
#   sudo cp deploy/tether.service /etc/systemd/system/   (or: tether service | sudo tee /etc/systemd/system/tether.service)
#   sudo systemctl daemon-reload && sudo systemctl enable --now tether
# Logs: journalctl -u tether -f
[Unit]
Description=tether link server for MicroPython boards
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User=${user}
Group=${user}
WorkingDirectory=${dir}
${state}
ExecStart=${[...exec, 'serve', '--config', config].map(word).join(' ')}
# On SIGTERM tether stops accepting links, closes them and its journal, and exits 0 within 5 s.
TimeoutStopSec=15
Restart=on-failure
RestartSec=1
# Everything tether prints goes to the journal (journalctl -u tether).
StandardOutput=journal
StandardError=journal
SyslogIdentifier=tether
# One socket per board, plus journal files.
LimitNOFILE=65536
# Serial ports (a mesh root on /dev/ttyUSB0) belong to the dialout group.
SupplementaryGroups=dialout

# Hardening. Left out on purpose: MemoryDenyWriteExecute (Node's JIT compiler needs it off),
# PrivateDevices (it would hide the serial ports) and ProtectClock (it implies a device allow-list
# that shuts out the serial ports too; without capabilities the clock is out of reach anyway).
NoNewPrivileges=yes
CapabilityBoundingSet=
ProtectSystem=strict
ProtectHome=${underHome ? 'read-only' : 'yes'}
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
# AF_NETLINK lets tether list this machine's addresses for its start-up log.
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK
UMask=0027

[Install]
WantedBy=multi-user.target
`;
}
