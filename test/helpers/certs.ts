/**
 * Throwaway PKI for the TLS tests, made with the real `openssl` command: a CA, a
 * server certificate for 127.0.0.1/localhost, client certificates with a chosen
 * CN, and a second CA nobody trusts. EC keys, so it takes milliseconds.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

export interface Pki {
  dir: string;
  ca: string;
  serverKey: string;
  serverCert: string;
  /** Key and certificate for a client certificate with subject CN = `cn`, signed by the CA (or by an untrusted CA). */
  client(cn: string, opts?: { untrusted?: boolean }): { key: string; cert: string };
  remove(): void;
}

function openssl(args: string[], cwd: string): void {
  execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

function keyAndCsr(dir: string, name: string, cn: string): void {
  openssl(['ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', `${name}.key`], dir);
  openssl(['req', '-new', '-key', `${name}.key`, '-subj', `/CN=${cn}`, '-out', `${name}.csr`], dir);
}

function selfSignedCa(dir: string, name: string, cn: string): void {
  openssl(['ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', `${name}.key`], dir);
  openssl(['req', '-x509', '-new', '-key', `${name}.key`, '-subj', `/CN=${cn}`, '-days', '2', '-out', `${name}.crt`], dir);
}

function sign(dir: string, name: string, ca: string, ext: string): void {
  fs.writeFileSync(path.join(dir, `${name}.ext`), ext);
  openssl(['x509', '-req', '-in', `${name}.csr`, '-CA', `${ca}.crt`, '-CAkey', `${ca}.key`, '-CAcreateserial', '-days', '2', '-extfile', `${name}.ext`, '-out', `${name}.crt`], dir);
}

export function makePki(): Pki {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-pki-'));
  selfSignedCa(dir, 'ca', 'tether test CA');
  selfSignedCa(dir, 'evil-ca', 'untrusted CA');
  keyAndCsr(dir, 'server', 'localhost');
  sign(dir, 'server', 'ca', 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n');
  let n = 0;
  return {
    dir,
    ca: path.join(dir, 'ca.crt'),
    serverKey: path.join(dir, 'server.key'),
    serverCert: path.join(dir, 'server.crt'),
    client(cn, opts = {}) {
      const name = `client-${n++}`;
      keyAndCsr(dir, name, cn);
      sign(dir, name, opts.untrusted ? 'evil-ca' : 'ca', 'extendedKeyUsage=clientAuth\n');
      return { key: path.join(dir, `${name}.key`), cert: path.join(dir, `${name}.crt`) };
    },
    remove() {
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
