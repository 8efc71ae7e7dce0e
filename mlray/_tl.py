import os, time, json
def mark(what):
    with open("/tmp/tl.txt", "a") as f:
        f.write(f"{time.time():.3f} {os.getpid()} {what}\n")
