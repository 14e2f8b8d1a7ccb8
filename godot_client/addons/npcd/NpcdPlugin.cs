#if TOOLS
using Godot;

namespace NpcdGodot
{
    /// <summary>Registers the project settings, the Npcd autoload and the export plugin.</summary>
    [Tool]
    public partial class NpcdPlugin : EditorPlugin
    {
        private const string AutoloadName = "Npcd";
        private NpcdExportPlugin exporter;

        public override void _EnterTree()
        {
            NpcdSettings.Register();
            AddAutoloadSingleton(AutoloadName, "res://addons/npcd/NpcdService.cs");
            exporter = new NpcdExportPlugin();
            AddExportPlugin(exporter);
        }

        public override void _ExitTree()
        {
            RemoveExportPlugin(exporter);
            exporter = null;
            RemoveAutoloadSingleton(AutoloadName);
        }
    }

    /// <summary>Ships the native library with an exported game: Godot copies a shared object
    /// added here next to the executable, where NpcdService looks for it (the addon's bin/
    /// folder is inside the .pck, which the loader cannot read).</summary>
    [Tool]
    public partial class NpcdExportPlugin : EditorExportPlugin
    {
        // The export's OS and architecture feature tags → the addon's bin/ folder for them (the
        // folders NpcdService reads in the editor; macOS universal builds take a universal dylib).
        private static readonly (string Os, string Arch, string Folder)[] Platforms =
        {
            ("linux", "x86_64", "linux-x64"), ("linux", "arm64", "linux-arm64"),
            ("windows", "x86_64", "windows-x64"),
            ("macos", "universal", "macos-universal"), ("macos", "arm64", "macos-arm64"), ("macos", "x86_64", "macos-x64"),
        };

        public override string _GetName() => "npcd";

        public override void _ExportBegin(string[] features, bool isDebug, string path, uint flags)
        {
            foreach (var (os, arch, folder) in Platforms)
            {
                if (System.Array.IndexOf(features, os) < 0 || System.Array.IndexOf(features, arch) < 0) continue;
                string file = os == "windows" ? "npcd_client.dll" : os == "macos" ? "libnpcd_client.dylib" : "libnpcd_client.so";
                string library = "res://addons/npcd/bin/" + folder + "/" + file;
                if (FileAccess.FileExists(library)) AddSharedObject(library, new string[0], "");
                else GD.PushError("npcd: " + library + " is missing: the exported game cannot reach the daemon (addons/npcd README: the native library per platform)");
                return;
            }
            GD.PushWarning("npcd: no native client for this export's platform (" + string.Join(",", features) + ")");
        }
    }
}
#endif
