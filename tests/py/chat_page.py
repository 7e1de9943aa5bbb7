"""The chat page of `ggmerge serve` in a real headless Chromium (Debian's chromium and
chromium-driver, driven by selenium): load it, move the `math` slider to 1, send a message,
wait for the streamed answer and the mixture shown under it, save a screenshot.
argv: BASE_URL SCREENSHOT.png"""
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

url, shot = sys.argv[1], sys.argv[2]
opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--no-first-run", "--window-size=1200,800"]:
    opts.add_argument(a)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
try:
    driver.get(url + "/")
    wait = WebDriverWait(driver, 300)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".expert-slider"))
    sliders = {s.get_attribute("data-name"): s for s in driver.find_elements(By.CSS_SELECTOR, ".expert-slider")}
    assert set(sliders) == {"math", "code"}, sliders.keys()
    # Move the math slider to 1 as a user would (value, then the input event the page listens to).
    driver.execute_script(
        "arguments[0].value = 1; arguments[0].dispatchEvent(new Event('input', {bubbles: true}));",
        sliders["math"])
    driver.find_element(By.ID, "input").send_keys("What is the capital of France?")
    driver.find_element(By.ID, "send").click()
    answer = wait.until(lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
                                   if e.get_attribute("data-done") == "1"])
    text = answer[-1].text
    assert text and not text.startswith("error"), text
    meta = driver.find_element(By.CSS_SELECTOR, ".meta")
    assert "math=1" in meta.text and "switch" in meta.text, meta.text
    print("answer:", repr(text))
    print("shown:", meta.text)
    driver.save_screenshot(shot)
finally:
    driver.quit()
