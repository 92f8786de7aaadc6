/** Which commands count as pip (what they write on the package disk is kept), and which files are never kept. */
import { describe, expect, it } from "vitest";
import { isStartupHook, pipArgs, pipRunArgv } from "../../src/workspace/packages.js";

describe("pip commands", () => {
  it("pip, pip3 and python -m pip, with pip's arguments; nothing else", () => {
    expect(pipArgs(["pip", "install", "x"])).toEqual(["install", "x"]);
    expect(pipArgs(["pip3.11", "list"])).toEqual(["list"]);
    expect(pipArgs(["python3", "-m", "pip", "install", "-r", "requirements.txt"])).toEqual(["install", "-r", "requirements.txt"]);
    expect(pipArgs(["python", "-mpip", "list"])).toEqual(["list"]);
    expect(pipArgs(["python3", "-I", "-m", "pip", "list"])).toEqual(["list"]);
    expect(pipArgs(["python3", "-Im", "pip", "list"])).toEqual(["list"]);
    for (const argv of [["python3", "x.py", "-m", "pip"], ["python3", "-c", "import pip", "-m", "pip"], ["python3", "-m", "pipx"], ["env", "pip", "install"], ["python3", "-W", "ignore", "-m", "pip"], ["pipx", "install"]]) {
      expect(pipArgs(argv), argv.join(" ")).toBeNull();
    }
  });

  it("runs as the image's Python with the user site's hooks and the working directory left out", () => {
    const argv = pipRunArgv(["install", "x"]);
    expect(argv.slice(0, 4)).toEqual(["/usr/bin/python3", "-s", "-P", "-c"]);
    expect(argv.slice(5)).toEqual(["install", "x"]);
  });

  it("start-up hooks in the user site are never kept; a .pth of paths is", () => {
    const sp = "user/lib/python3.11/site-packages";
    expect(isStartupHook(`${sp}/usercustomize.py`)).toBe(true);
    expect(isStartupHook(`${sp}/sitecustomize.pyc`)).toBe(true);
    expect(isStartupHook(`${sp}/usercustomize`)).toBe(true);
    expect(isStartupHook(`${sp}/x.pth`, "import os; os.system('x')\n")).toBe(true);
    expect(isStartupHook(`${sp}/x.pth`, "/workspace/src\n")).toBe(false);
    expect(isStartupHook(`${sp}/requests/__init__.py`)).toBe(false);
    expect(isStartupHook(`cache/usercustomize.py`)).toBe(false);
  });
});
