// Entry point of the dashboard API: reads the config from the environment,
// starts the server and shuts it down cleanly on SIGINT/SIGTERM.
'use strict';

const { loadConfig } = require('./src/config');
const { startServer } = require('./src/app');

async function main() {
  const config = loadConfig();
  const { url, close } = await startServer(config);
  console.log(`listening on ${url} (variant=${config.variant} pid=${process.pid})`);

  let stopping = false;
  function shutdown(signal) {
    if (stopping) return;
    stopping = true;
    console.log(`${signal} received, shutting down`);
    close().then(() => process.exit(0), (err) => {
      console.error(err);
      process.exit(1);
    });
  }
  process.on('SIGINT', shutdown);
  process.on('SIGTERM', shutdown);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
