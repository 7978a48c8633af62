// Opens page.html in headless Chromium (driven by playwright-core) and waits until
// @segment/analytics-next has sent its three calls to Sluice.
import { chromium } from 'playwright-core'

const [pageUrl] = process.argv.slice(2)
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
})
try {
  const page = await browser.newPage()
  const failures = []
  page.on('requestfailed', (r) => failures.push(`${r.url()}: ${r.failure()?.errorText}`))
  page.on('console', (m) => m.type() === 'error' && failures.push(`console: ${m.text()}`))
  await page.goto(pageUrl)
  await page.waitForFunction(() => document.title !== 'loading', null, { timeout: 30000 })
  const title = await page.title()
  if (title !== 'done' || failures.length) {
    console.error('browser:', title, failures)
    process.exit(1)
  }
  console.log('browser: analytics-next sent identify, track and page')
} finally {
  await browser.close()
}
