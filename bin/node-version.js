'use strict';
// The Node.js version check of the `tether` command. Written in syntax every Node.js parses
// (var, function, no arrows or optional chaining), so that an old Node gets this far and
// prints the message instead of a syntax error.

var MIN = [20, 19];

/** True when `version` ("18.19.1" or "v18.19.1") is older than MIN. */
function tooOld(version) {
  var parts = String(version).replace(/^v/, '').split('.');
  for (var i = 0; i < MIN.length; i++) {
    var n = Number(parts[i]) || 0;
    if (n > MIN[i]) return false;
    if (n < MIN[i]) return true;
  }
  return false;
}

/** What to tell the user, naming both versions and where to get a new enough Node. */
function message(version) {
  return (
    'tether needs Node.js ' + MIN.join('.') + ' or newer; this is Node.js ' + String(version).replace(/^v/, '') + '.\n' +
    'Install a current Node.js (22 LTS, for example) from NodeSource (https://github.com/nodesource/distributions)\n' +
    'or with nvm (https://github.com/nvm-sh/nvm), then run tether again (the nodejs package of Debian 12 and\n' +
    'Raspberry Pi OS bookworm is 18.x, too old). The "Install" section of tether\'s README has the steps.'
  );
}

module.exports = { MIN: MIN.join('.'), tooOld: tooOld, message: message };
