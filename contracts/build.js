// Compiles HotpotMarket.sol with the pinned solcjs into HotpotMarket.json
// (ABI + creation bytecode), the artifact the Rust side embeds.
//   node contracts/build.js          writes the artifact
//   node contracts/build.js --check  fails if the committed one differs
'use strict';
const fs = require('fs');
const path = require('path');
const solc = require('solc');

const source = path.join(__dirname, 'HotpotMarket.sol');
const artifact = path.join(__dirname, 'HotpotMarket.json');

const input = {
  language: 'Solidity',
  sources: { 'HotpotMarket.sol': { content: fs.readFileSync(source, 'utf8') } },
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: 'cancun',
    // No metadata hash in the bytecode, so the artifact depends only on
    // the source and the compiler.
    metadata: { bytecodeHash: 'none' },
    outputSelection: { '*': { HotpotMarket: ['abi', 'evm.bytecode.object'] } },
  },
};
const output = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (output.errors || []).filter((e) => e.severity === 'error');
for (const e of output.errors || []) console.error(e.formattedMessage);
if (errors.length > 0) process.exit(1);

const c = output.contracts['HotpotMarket.sol'].HotpotMarket;
const text = JSON.stringify(
  { contractName: 'HotpotMarket', compiler: `solc ${solc.version()}`, abi: c.abi, bytecode: '0x' + c.evm.bytecode.object },
  null,
  2,
) + '\n';

if (process.argv.includes('--check')) {
  const committed = fs.existsSync(artifact) ? fs.readFileSync(artifact, 'utf8') : '';
  if (committed !== text) {
    console.error(`${artifact} is not what ${source} compiles to; run: node contracts/build.js`);
    process.exit(1);
  }
  console.log(`${path.basename(artifact)} matches its source (solc ${solc.version()})`);
} else {
  fs.writeFileSync(artifact, text);
  console.log(`wrote ${artifact} (solc ${solc.version()}, ${c.evm.bytecode.object.length / 2} bytes)`);
}
