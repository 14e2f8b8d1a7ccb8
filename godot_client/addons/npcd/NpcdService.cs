using System;
using System.IO;
using System.Reflection;
using System.Runtime.InteropServices;
using Godot;
using Npcd;

namespace NpcdGodot
{
    /// <summary>The Npcd autoload: owns the one NpcdClient and polls it every frame on the
    /// main thread, before other nodes (process priority), so that line events and the
    /// NpcDialogue signals always fire on the main thread.</summary>
    public partial class NpcdService : Node
    {
        public NpcdClient Client { get; private set; }

        public override void _EnterTree()
        {
            ProcessPriority = -100;
            NativeLibrary.SetDllImportResolver(typeof(NpcdClient).Assembly, Resolve);
            string token = (string)ProjectSettings.GetSetting(NpcdSettings.Token, "");
            if (string.IsNullOrEmpty(token)) token = System.Environment.GetEnvironmentVariable("NPCD_TOKEN");
            string rootsPath = (string)ProjectSettings.GetSetting(NpcdSettings.RootCertsPemPath, "");
            string serverName = (string)ProjectSettings.GetSetting(NpcdSettings.TlsServerName, "");
            Client = new NpcdClient(new NpcdClientOptions((string)ProjectSettings.GetSetting(NpcdSettings.Address, "127.0.0.1:50051"))
            {
                InitialBackoffMs = (uint)(int)ProjectSettings.GetSetting(NpcdSettings.InitialBackoffMs, 250),
                MaxBackoffMs = (uint)(int)ProjectSettings.GetSetting(NpcdSettings.MaxBackoffMs, 5000),
                Token = string.IsNullOrEmpty(token) ? null : token,
                Tls = (bool)ProjectSettings.GetSetting(NpcdSettings.UseTls, false),
                RootCertsPem = string.IsNullOrEmpty(rootsPath) ? null : File.ReadAllText(ProjectSettings.GlobalizePath(rootsPath)),
                TlsServerName = string.IsNullOrEmpty(serverName) ? null : serverName,
            });
        }

        public override void _Process(double delta)
        {
            Client.Poll();
        }

        public override void _ExitTree()
        {
            Client.Dispose();
            Client = null;
        }

        /// <summary>Finds the native library: in the addon's bin/ folder in the editor, next to
        /// the executable in an exported game.</summary>
        private static IntPtr Resolve(string name, Assembly assembly, DllImportSearchPath? path)
        {
            if (name != "npcd_client") return IntPtr.Zero;
            string file = OperatingSystem.IsWindows() ? "npcd_client.dll"
                : OperatingSystem.IsMacOS() ? "libnpcd_client.dylib" : "libnpcd_client.so";
            string platform = (OperatingSystem.IsWindows() ? "windows" : OperatingSystem.IsMacOS() ? "macos" : "linux")
                + "-" + RuntimeInformation.ProcessArchitecture.ToString().ToLowerInvariant();
            string[] candidates =
            {
                ProjectSettings.GlobalizePath("res://addons/npcd/bin/" + platform + "/" + file),
                Path.Combine(Path.GetDirectoryName(OS.GetExecutablePath()) ?? ".", file),
            };
            foreach (string candidate in candidates)
            {
                if (File.Exists(candidate) && NativeLibrary.TryLoad(candidate, out IntPtr handle)) return handle;
            }
            return IntPtr.Zero;
        }
    }
}
