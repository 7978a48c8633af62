// Sends messages of every type with the official Segment Node client (@segment/analytics-node)
// and writes what it sent, one JSON object per line, for check.py.
import { Analytics } from '@segment/analytics-node'
import { writeFileSync } from 'node:fs'

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, v, i, all) => (i % 2 ? pairs : [...pairs, [all[i].replace(/^--/, ''), all[i + 1]]]), [])
)
const count = Number(args.count ?? 300)
const analytics = new Analytics({ writeKey: args['write-key'], host: args.host, maxEventsInBatch: 25, flushInterval: 100 })
const errors = []
analytics.on('error', (err) => errors.push(String(err?.reason ?? err?.message ?? err)))

const sent = []
for (let i = 0; i < count; i++) {
  const messageId = `node-${i}`
  const userId = `node-user-${i % 13}`
  const kind = ['track', 'identify', 'page', 'screen', 'group', 'alias'][i % 6]
  if (kind === 'track') {
    const properties = { sku: `sku-${i}`, price: i + 0.99, quantity: i % 5, gift: i % 3 === 0, emoji: '🚀', list: [1, 2, 3], deep: { a: { b: i } } }
    analytics.track({ userId, event: 'Product Added', properties, messageId, timestamp: new Date('2026-05-04T03:02:01.500Z') })
    // The interop plan allows prices up to 250 and this source flags violations.
    sent.push({ messageId, type: kind, userId, event: 'Product Added', properties, originalTimestamp: '2026-05-04T03:02:01.500Z',
      expect: properties.price > 250 ? 'flagged' : 'accepted' })
  } else if (kind === 'identify') {
    const traits = { name: `User ${i}`, age: 30 + (i % 10) }
    analytics.identify({ userId, traits, messageId })
    sent.push({ messageId, type: kind, userId, traits })
  } else if (kind === 'page') {
    analytics.page({ anonymousId: `anon-n-${i}`, name: 'Docs', properties: { path: '/docs' }, messageId })
    sent.push({ messageId, type: kind, anonymousId: `anon-n-${i}`, name: 'Docs' })
  } else if (kind === 'screen') {
    analytics.screen({ userId, name: 'Settings', messageId })
    sent.push({ messageId, type: kind, userId, name: 'Settings' })
  } else if (kind === 'group') {
    analytics.group({ userId, groupId: `team-${i % 4}`, traits: { plan: 'team' }, messageId })
    sent.push({ messageId, type: kind, userId, groupId: `team-${i % 4}` })
  } else {
    analytics.alias({ userId, previousId: `anon-n-${i}`, messageId })
    sent.push({ messageId, type: kind, userId, previousId: `anon-n-${i}` })
  }
}
await analytics.closeAndFlush({ timeout: 30000 })
if (errors.length) {
  console.error('node client errors:', errors.slice(0, 5))
  process.exit(1)
}
writeFileSync(args.out, sent.map((m) => JSON.stringify(m)).join('\n') + '\n')
console.log(`node: sent ${sent.length} messages`)
