#!/usr/bin/env node
'use strict';
// The `tether` command. It runs the compiled JavaScript in dist/ in this very process (no
// wrapper process, so signals reach the server), with no TypeScript at run time.
//
// First of all, before anything else loads: is this Node.js new enough? (bin/node-version.js
// keeps to syntax an old Node parses, so the user reads what to install, not a SyntaxError.)
var nodeVersion = require('./node-version');
if (nodeVersion.tooOld(process.versions.node)) {
  process.stderr.write(nodeVersion.message(process.versions.node) + '\n');
  process.exit(1);
}

var fs = require('fs');
var path = require('path');
var root = path.join(__dirname, '..');

function loadCli() {
  // Development and tests (the ava config sets TETHER_SOURCE=1): the TypeScript sources through
  // ts-node, so a changed source needs no build. Only in a clone of the repository, which has src/.
  if (process.env.TETHER_SOURCE === '1' && fs.existsSync(path.join(root, 'src', 'cli.ts'))) {
    require('ts-node').register({ transpileOnly: true, project: path.join(root, 'tsconfig.json') });
    return require('../src/cli');
  }
  var compiled = path.join(root, 'dist', 'src', 'cli.js');
  if (!fs.existsSync(compiled)) {
    process.stderr.write(
      'tether: the compiled code is missing (' + compiled + ').\n' +
        'In a clone of the repository, build it first: npm ci (which builds), or npm run build.\n',
    );
    process.exit(1);
  }
  warnIfStale();
  return require(compiled);
}

/**
 * In a clone of the repository: a source newer than the last build means dist/ runs old code (and
 * an example or qos script newer than it would be loaded through ts-node, beside the build).
 */
function warnIfStale() {
  var stamp = path.join(root, 'dist', '.built');
  if (!fs.existsSync(path.join(root, 'src')) || !fs.existsSync(stamp)) return;
  var built = fs.statSync(stamp).mtimeMs;
  var newer = null;
  function walk(dir) {
    fs.readdirSync(dir, { withFileTypes: true }).forEach(function (e) {
      var p = path.join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (!newer && /\.ts$/.test(e.name) && fs.statSync(p).mtimeMs > built) newer = p;
    });
  }
  ['src', 'examples', 'qos'].forEach(function (d) {
    if (fs.existsSync(path.join(root, d))) walk(path.join(root, d));
  });
  if (newer) {
    process.stderr.write(
      'tether: warning: ' + path.relative(process.cwd(), newer) + ' changed after the last build, and this runs the build ' +
        '(dist/): npm run build, or TETHER_SOURCE=1 to run the sources through ts-node\n',
    );
  }
}

/**
 * Started by npm (npx tether, npm start, npm run demo), tether runs under npm and `sh -c`. A
 * SIGTERM to npm ends the shell but never reaches tether, which would be left running, holding
 * its ports. So when the process that started us goes away, stop as if SIGTERM had come.
 */
function stopWithParent() {
  if (!process.env.npm_lifecycle_event || process.platform === 'win32') return;
  var parent = parentPid();
  if (!(parent > 1)) return;
  var timer = setInterval(function () {
    if (parentPid() === parent) return;
    clearInterval(timer);
    process.stderr.write('tether: npm, which started this process, has gone away: stopping\n');
    process.kill(process.pid, 'SIGTERM');
  }, 1000);
  timer.unref();
}

/** The current parent process ID (process.ppid is fixed at start). */
function parentPid() {
  try {
    // Linux: the field after the command name in /proc/self/stat, which may itself hold spaces.
    var stat = fs.readFileSync('/proc/self/stat', 'utf8');
    return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
  } catch {
    // Elsewhere: the parent we started with, as long as it exists.
    try {
      process.kill(process.ppid, 0);
      return process.ppid;
    } catch (e2) {
      return e2 && e2.code === 'EPERM' ? process.ppid : 1;
    }
  }
}

/**
 * A reader of our output that has gone (a closed pipe: `tether serve | head`, or npm gone under
 * npx) must not take the server down, nor make it spin: every log line would fail again with EPIPE,
 * and the error would be logged, failing again. Output to a closed pipe is dropped.
 */
function dropOutputToClosedPipes() {
  [process.stdout, process.stderr].forEach(function (stream) {
    stream.on('error', function (e) {
      if (e && (e.code === 'EPIPE' || e.code === 'ECONNRESET' || e.code === 'ERR_STREAM_DESTROYED')) return;
      throw e;
    });
  });
}

dropOutputToClosedPipes();
var cli = loadCli();
stopWithParent();
cli.main(process.argv.slice(2)).then(function (code) {
  process.exit(code);
});
