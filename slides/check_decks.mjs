// Open built Marp decks in headless Chromium and report, as JSON on stdout, what rendered.
//
//   node slides/check_decks.mjs --screenshots build/slides/screenshots [--all] deck.html ...
//
// The browser is $CHROME_PATH, else the first of chromium / chromium-browser / google-chrome
// on the PATH. For every deck the report gives:
//   slides    - slides in Marp's bespoke container (one <svg data-marpit-svg> per slide)
//   sections  - content <section>s (a slide with a split background image also has a
//               "background" and a "pseudo" section; those are not counted)
//   images    - every <img> of the slides: src, complete, naturalWidth
//   backgrounds - every CSS background image of the slides (![bg]), loaded in the page
//   overflow  - slides whose content is taller or wider than the slide (text cut off)
//   external  - requests that would need the network (the html must work offline)
//   failed    - requests that failed, and errors thrown by the page
//   screenshot - PNG of the first slide (with --all, every slide: <deck>-NN.png)
// Exit status: 0 when every deck could be opened (problems are in the JSON), 2 otherwise.

import { accessSync, constants, mkdirSync } from "node:fs";
import { basename, delimiter, join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import puppeteer from "puppeteer-core";

function findBrowser() {
  if (process.env.CHROME_PATH) return process.env.CHROME_PATH;
  for (const name of ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]) {
    for (const dir of (process.env.PATH || "").split(delimiter)) {
      const candidate = join(dir, name);
      try {
        accessSync(candidate, constants.X_OK);
        return candidate;
      } catch {
        // not here
      }
    }
  }
  return null;
}

function parseArgs(argv) {
  const args = { screenshots: "build/slides/screenshots", all: false, decks: [] };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--screenshots") args.screenshots = argv[++i];
    else if (argv[i] === "--all") args.all = true;
    else args.decks.push(argv[i]);
  }
  return args;
}

// Runs in the page: everything the report needs from the DOM.
function inspectDeck() {
  const root = document.getElementById(":$p");
  if (!root) return { error: "no Marp bespoke container (div#:$p) in the page" };
  const svgs = [...root.querySelectorAll(":scope > svg[data-marpit-svg]")];
  const isContent = (s) => !["background", "pseudo"].includes(s.dataset.marpitAdvancedBackground);
  const sections = svgs.flatMap((svg) =>
    [...svg.querySelectorAll(":scope > foreignObject > section")].filter(isContent),
  );
  const images = [...root.querySelectorAll("img")].map((img) => ({
    src: img.getAttribute("src"),
    complete: img.complete,
    naturalWidth: img.naturalWidth,
  }));
  const backgrounds = new Set();
  for (const el of root.querySelectorAll("section, section *")) {
    const bg = getComputedStyle(el).backgroundImage;
    for (const m of bg.matchAll(/url\("?([^")]+)"?\)/g)) {
      if (!m[1].startsWith("data:")) backgrounds.add(m[1]);
    }
  }
  // Inactive slides are hidden with visibility (not display), so they keep their layout.
  const overflow = [];
  sections.forEach((s, i) => {
    if (s.scrollHeight > s.clientHeight + 1 || s.scrollWidth > s.clientWidth + 1) {
      overflow.push({ slide: i + 1, scrollHeight: s.scrollHeight, clientHeight: s.clientHeight });
    }
  });
  return { slides: svgs.length, sections: sections.length, images, backgrounds: [...backgrounds], overflow };
}

// Runs in the page: load one background URL as an image.
function loadImage(url) {
  return new Promise((done) => {
    const img = new Image();
    const timer = setTimeout(() => done({ src: url, complete: false, naturalWidth: 0 }), 10000);
    img.onload = img.onerror = () => {
      clearTimeout(timer);
      done({ src: url, complete: img.complete, naturalWidth: img.naturalWidth });
    };
    img.src = url;
  });
}

async function checkDeck(browser, html, screenshots, all) {
  const page = await browser.newPage();
  await page.setViewport({ width: 1280, height: 720, deviceScaleFactor: 1 });
  const external = [];
  const failed = [];
  page.on("request", (req) => {
    if (!/^(file|data|blob|about):/.test(req.url())) external.push(req.url());
  });
  page.on("requestfailed", (req) => failed.push(`${req.url()}: ${req.failure()?.errorText}`));
  page.on("pageerror", (err) => failed.push(`page error: ${err.message}`));
  await page.goto(pathToFileURL(resolve(html)).href, { waitUntil: "load" });
  const report = await page.evaluate(inspectDeck);
  const name = basename(html, ".html");
  if (report.error) {
    await page.close();
    return { deck: name, html, ...report };
  }
  report.backgrounds = await Promise.all(
    report.backgrounds.map((url) => page.evaluate(loadImage, url)),
  );
  // Screenshots show the slide, not the on-screen controls that appear on navigation.
  await page.addStyleTag({ content: ".bespoke-marp-osc { display: none !important; }" });
  const shots = [];
  const count = all ? report.slides : 1;
  for (let i = 1; i <= count; i++) {
    if (i > 1) {
      await page.evaluate((n) => { location.hash = `#${n}`; }, i);
      await new Promise((r) => setTimeout(r, 150));
    }
    const path = join(screenshots, all ? `${name}-${String(i).padStart(2, "0")}.png` : `${name}.png`);
    await page.screenshot({ path });
    shots.push(path);
  }
  await page.close();
  return { deck: name, html, ...report, external, failed, screenshot: shots[0], screenshots: shots };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  if (args.decks.length === 0) {
    console.error("usage: node check_decks.mjs [--screenshots DIR] [--all] deck.html ...");
    return 2;
  }
  const executablePath = findBrowser();
  if (!executablePath) {
    console.error("no Chromium found: set CHROME_PATH or install chromium");
    return 2;
  }
  mkdirSync(args.screenshots, { recursive: true });
  const browser = await puppeteer.launch({
    executablePath,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"],
  });
  try {
    const decks = [];
    for (const html of args.decks) decks.push(await checkDeck(browser, html, args.screenshots, args.all));
    console.log(JSON.stringify({ browser: await browser.version(), executablePath, decks }, null, 1));
  } finally {
    await browser.close();
  }
  return 0;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(`check_decks: ${err.stack || err}`);
    process.exit(2);
  },
);
