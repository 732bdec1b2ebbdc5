/** The `mqtt` package, loaded on first use: servers without a bridge never pay for loading it. */
let mod: typeof import('mqtt') | null = null;

export function loadMqtt(): typeof import('mqtt') {
   
  mod ??= require('mqtt') as typeof import('mqtt');
  return mod;
}
